"""Turn Hydra / OmegaConf composition failures into one message: what key, from where, and what to do.

Hydra already knows the config file ("In 'model/llama3_70b'") or the override that failed, and
OmegaConf the full key; this module adds the nearest valid key (difflib) and the expected type from
the schema, so ``dpo.betaa=0.2`` reads as "unknown key 'dpo.betaa' ... did you mean 'dpo.beta'?".
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional

from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key, where it came from, and the fix."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def schema_type_at(schema: type | None, dotted: str) -> Any:
    """Type annotation at ``dotted`` (``"parallel.tp"``, ``"optim.betas[1]"``) in a dataclass schema, or None."""
    tp: Any = schema
    for part in dotted.split(".") if dotted else []:
        name, *indices = re.split(r"\[", part)
        tp, _ = _unwrap_optional(tp)
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        hints = typing.get_type_hints(tp)
        if name not in hints:
            return None
        tp = hints[name]
        for _ in indices:  # a list element: its item type
            args = typing.get_args(_unwrap_optional(tp)[0])
            tp = args[0] if args else None
    return tp


def valid_keys_at(schema: type | None, dotted: str) -> list[str]:
    """Field names of the dataclass at ``dotted`` in ``schema`` (empty when it is not a dataclass)."""
    tp, _ = _unwrap_optional(schema_type_at(schema, dotted))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [f.name for f in dataclasses.fields(tp)]
    return []


def describe_type(tp: Any) -> str:
    """Human wording of a schema type: ``Optional[int]`` -> "an integer or null"."""
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if inner is bool:
        text = "true or false"
    elif inner is int:
        text = "an integer"
    elif inner is float:
        text = "a number"
    elif inner is str:
        text = "a string"
    elif origin is list:
        text = "a list"
    elif origin is dict or inner is dict:
        text = "a mapping"
    elif isinstance(inner, type) and dataclasses.is_dataclass(inner):
        text = f"a mapping with the keys of {inner.__name__}"
    else:
        text = "any value"
    return text + (" or null" if optional else "")


def nearest(word: str, options: list[str]) -> Optional[str]:
    """The option closest to ``word`` (a case-insensitive match, then difflib), or None."""
    same = next((o for o in options if o.lower() == word.lower()), None)
    if same is not None:
        return same
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return close[0] if close else None


def _omegaconf_cause(exc: BaseException) -> OmegaConfBaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OmegaConfBaseException):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def find_override(overrides: list[str], key: str) -> Optional[str]:
    """The command-line override that sets ``key`` (``dpo.beta=0.2``, ``+dpo.x=1``), or None."""
    for ov in overrides:
        name = ov.split("=", 1)[0].lstrip("+~")
        if name == key:
            return ov
    return None


def where_from_hydra(exc: BaseException, overrides: list[str], config_file: Any) -> str:
    """Where a Hydra composition error came from: a config file or a command-line override."""
    text = str(exc)
    m = re.match(r"In '?([^':]+)'?:", text)
    if m:
        return f"config '{m.group(1)}' ({config_file(m.group(1))})"
    m = (re.match(r"Could not (?:override|append to) '([^']+)'", text)
         or re.match(r"Error merging override ([^=\s]+)", text)
         or re.match(r"Error parsing override '([^'=]+)", text))
    if m:
        key = m.group(1).lstrip("+~")
        return f"command-line override '{find_override(overrides, key) or key}'"
    m = re.search(r"full_key: (\S+)", text)
    if m and find_override(overrides, m.group(1)):
        return f"command-line override '{find_override(overrides, m.group(1))}'"
    return "the config"


def unknown_key_error(where: str, full_key: str, schema: type | None) -> ConfigError:
    """"<where>: unknown key 'dpo.betaa'; did you mean 'dpo.beta'?" (or the valid keys when none is close)."""
    parent, _, key = full_key.rpartition(".")
    options = valid_keys_at(schema, parent)
    best = nearest(key, options)
    if best is not None:
        hint = f"; did you mean '{parent + '.' if parent else ''}{best}'?"
    elif options:
        hint = f"; valid keys under '{parent or '<top level>'}': {', '.join(options)}"
    else:
        hint = ""
    return ConfigError(f"{where}: unknown key '{full_key}'{hint}")


def explain(exc: BaseException, where: str, schema: type | None) -> ConfigError:
    """A ConfigError for ``exc`` raised while composing; ``where`` says which file or override."""
    cause = _omegaconf_cause(exc)
    full_key = getattr(cause, "full_key", None) if cause is not None else None
    if cause is None or not full_key:
        key = re.search(r"full_key: (\S+)", str(exc))
        if key:  # an exception OmegaConf raised without wrapping it
            first = str(exc).strip().splitlines()[0]
            return ConfigError(f"{where}: '{key.group(1)}' could not be set ({type(exc).__name__}: {first}); "
                               f"set it in a YAML file instead")
        # Hydra's own message (an override it cannot parse, a missing file); drop the search-path dump.
        text = str(exc).strip().split("\nConfig search path:")[0].split("\nSee https://")[0]
        text = re.sub(r"^In '?[^':]+'?: ", "", text).replace("\n\n", "\n").replace("\n", "; ").replace("\t", "")
        return ConfigError(f"{where}: {text or type(exc).__name__}")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in" in str(cause):
        return unknown_key_error(where, full_key, schema)
    if isinstance(cause, MissingMandatoryValue):
        return ConfigError(f"{where}: '{full_key}' is required but not set; give it in the YAML or as "
                           f"'{full_key}=VALUE'")
    if isinstance(cause, ValidationError):
        expected = describe_type(schema_type_at(schema, full_key)) if schema is not None else "another type"
        value = re.search(r"Value '(.*?)'", str(cause))
        got = f", got '{value.group(1)}'" if value else ""
        return ConfigError(f"{where}: '{full_key}' expects {expected}{got}")
    first = str(cause).strip().splitlines()[0]
    return ConfigError(f"{where}: {full_key}: {first}")


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
