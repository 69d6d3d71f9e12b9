"""Validate records against the data formats of DESIGN.md, with errors that name file, line and field.

Formats (``fmt``):

- ``sft``: ``{"messages": [{"role", "content"}, ...]}`` (roles system / user / assistant, at least one
  assistant turn) or ``{"prompt": str | messages, "completion": str}``. A record with ``messages``
  uses them and ignores other keys (datasets such as UltraChat carry a ``prompt`` column too).
- ``preference``: ``{"prompt": str | messages, "chosen": ..., "rejected": ...}``; a response is a string
  or a message list ending with an assistant turn.
- ``kto``: ``{"prompt": str | messages, "completion": str | messages, "label": true | false}``.
- ``prompt``: ``{"prompt": str | messages, ...}``; extra columns (``solution``) are kept for reward functions.

Every error reads ``file:line: field 'messages[2].content': what is wrong; what to do``. An empty
response (an assistant reply that is empty or whitespace) is an error by default and can be skipped
with ``data.empty_response=skip``.
"""
from __future__ import annotations

from typing import Any

from aligner.data.errors import DataError, json_type_name
from aligner.data.readers import Records

FORMATS = ("sft", "preference", "kto", "prompt")
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, Any]]


class EmptyResponseError(DataError):
    """An empty assistant reply; skipped instead of raised under ``empty_response="skip"``."""


def _error(where: str, field: str, problem: str, fix: str, kind: type[DataError] = DataError) -> DataError:
    return kind(f"{where}: field '{field}': {problem}; {fix}")


def _require(record: dict[str, Any], key: str, where: str, shape: str) -> Any:
    if key not in record:
        have = ", ".join(sorted(record)) or "no keys"
        raise _error(where, key, "missing", f"a record of this format is {shape} (this one has: {have})")
    return record[key]


def _check_text(value: Any, where: str, field: str, *, response: bool) -> None:
    if not isinstance(value, str):
        raise _error(where, field, f"expected a string, got {json_type_name(value)}", "write the text as a JSON string")
    if response and not value.strip():
        raise _error(where, field, "empty response", "write the response, remove the record, or set "
                     "data.empty_response=skip", EmptyResponseError)


def _check_messages(value: Any, where: str, field: str, *, need_assistant: bool) -> None:
    """A non-empty list of {"role", "content"} dicts; assistant contents must be non-empty strings."""
    if not isinstance(value, list):
        raise _error(where, field, f"expected a list of messages, got {json_type_name(value)}",
                     'write [{"role": "user", "content": "..."}, ...]')
    if not value:
        raise _error(where, field, "empty list of messages", "add the conversation's turns or remove the record")
    for i, message in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise _error(where, at, f"expected a message object, got {json_type_name(message)}",
                         'write {"role": ..., "content": ...}')
        if "role" not in message:
            raise _error(where, f"{at}.role", "missing", 'every message needs "role" and "content"')
        role = message["role"]
        if role not in ROLES:
            shown = f"'{role}'" if isinstance(role, str) else f"of type {json_type_name(role)}"
            raise _error(where, f"{at}.role", f"unknown role {shown}", f"use one of {', '.join(ROLES)}")
        if "content" not in message:
            raise _error(where, f"{at}.content", "missing", 'every message needs "role" and "content"')
        _check_text(message["content"], where, f"{at}.content", response=role == "assistant")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise _error(where, field, "no assistant turn, so nothing to train on",
                     "add an assistant message or remove the record")


def _check_prompt(value: Any, where: str, field: str = "prompt") -> None:
    if isinstance(value, list):
        _check_messages(value, where, field, need_assistant=False)
    elif not isinstance(value, str):
        raise _error(where, field, f"expected a string or a list of messages, got {json_type_name(value)}",
                     "write the prompt as a JSON string or a message list")
    elif not value.strip():
        raise _error(where, field, "empty prompt", "write the prompt or remove the record")


def _check_response(value: Any, where: str, field: str) -> None:
    if isinstance(value, list):
        _check_messages(value, where, field, need_assistant=True)
        if value[-1]["role"] != "assistant":
            raise _error(where, f"{field}[{len(value) - 1}].role", f"the response ends with a "
                         f"'{value[-1]['role']}' turn", "end the response with the assistant's reply")
    else:
        _check_text(value, where, field, response=True)


def validate_record(record: dict[str, Any], where: str, fmt: str) -> None:
    """Raise :class:`DataError` (:class:`EmptyResponseError` for an empty reply) if ``record`` does not fit ``fmt``."""
    if fmt == "sft":
        if "messages" in record:
            _check_messages(record["messages"], where, "messages", need_assistant=True)
            return
        if "prompt" not in record and "completion" not in record:
            have = ", ".join(sorted(record)) or "no keys"
            raise DataError(f"{where}: neither 'messages' nor 'prompt'/'completion' (the record has: {have}); an SFT "
                            f'record is {{"messages": [...]}} or {{"prompt": ..., "completion": ...}}')
        shape = '{"prompt": ..., "completion": ...}'
        _check_prompt(_require(record, "prompt", where, shape), where)
        _check_text(_require(record, "completion", where, shape), where, "completion", response=True)
    elif fmt == "preference":
        shape = '{"prompt": ..., "chosen": ..., "rejected": ...}'
        _check_prompt(_require(record, "prompt", where, shape), where)
        _check_response(_require(record, "chosen", where, shape), where, "chosen")
        _check_response(_require(record, "rejected", where, shape), where, "rejected")
    elif fmt == "kto":
        shape = '{"prompt": ..., "completion": ..., "label": true|false}'
        _check_prompt(_require(record, "prompt", where, shape), where)
        _check_response(_require(record, "completion", where, shape), where, "completion")
        label = _require(record, "label", where, shape)
        if not isinstance(label, bool):
            raise _error(where, "label", f"expected true or false, got {json_type_name(label)} {label!r}",
                         "write the label as a JSON boolean (true: desirable, false: undesirable)")
    elif fmt == "prompt":
        _check_prompt(_require(record, "prompt", where, '{"prompt": ..., <extra columns>}'), where)
    else:
        raise ValueError(f"unknown data format '{fmt}'; use one of {', '.join(FORMATS)}")


def validate_records(records: Records, fmt: str, empty_response: str = "error") -> tuple[Records, int]:
    """Check every record; return the records kept and how many empty-response records were skipped.

    Raises one :class:`DataError` naming the first bad record, followed by where the next few are, so a
    user fixes the file in one pass instead of one error per run. ``empty_response`` is ``error`` or ``skip``.
    """
    if empty_response not in ("error", "skip"):
        raise ValueError(f"empty_response is '{empty_response}'; use 'error' or 'skip'")
    kept: Records = []
    failures: list[tuple[str, DataError]] = []
    skipped = 0
    for record, where in records:
        try:
            validate_record(record, where, fmt)
        except EmptyResponseError as e:
            if empty_response == "skip":
                skipped += 1
                continue
            failures.append((where, e))
        except DataError as e:
            failures.append((where, e))
        else:
            kept.append((record, where))
    if failures:
        message = str(failures[0][1])
        if len(failures) > 1:
            shown = ", ".join(where for where, _ in failures[1:6])
            more = ", ..." if len(failures) > 6 else ""
            message += f"\n({len(failures) - 1} more invalid records: {shown}{more})"
        raise DataError(message)
    return kept, skipped


def prompt_messages(prompt: str | Messages) -> Messages:
    """A prompt as a message list: a string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def sft_messages(record: dict[str, Any]) -> Messages:
    """The conversation of a validated SFT record (prompt/completion becomes prompt turns + an assistant turn)."""
    if "messages" in record:
        return record["messages"]
    return prompt_messages(record["prompt"]) + [{"role": "assistant", "content": record["completion"]}]
