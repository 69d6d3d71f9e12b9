"""The one error type of the data pipeline."""
from __future__ import annotations


class DataError(ValueError):
    """A data file or record that cannot be used.

    The message is complete on its own (``file:line: field 'x': what is wrong; what to do``), so a
    command-line entry point prints ``str(error)`` and exits non-zero, with no traceback.
    """


def json_type_name(value: object) -> str:
    """The JSON name of a value's type (``string``, ``int``, ``list``, ``object``, ``null``) for error messages."""
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
