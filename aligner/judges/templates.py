"""Load and render the LLM-as-judge and meta-judge prompt templates (Jinja2 files).

A judge template turns ``(prompt, response)`` into the text the judge model is asked to complete; a
meta-judge template turns ``(prompt, response, judgement_a, judgement_b)`` into a request to say which of
two judgements of the same response is more accurate. Both also get ``messages``: the whole conversation
when the prompt is a chat message list (a one-turn user list for a string prompt). See docs/judges.md.

Templates are checked when loaded, so a bad file fails at start-up and not after the first rollout: the
file must exist, parse, and use every required variable of its kind. Rendering is strict: a variable the
template uses but the caller did not pass is an error, never an empty string.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_JUDGE_TEMPLATE: Path = TEMPLATE_DIR / "judge.jinja"
DEFAULT_META_JUDGE_TEMPLATE: Path = TEMPLATE_DIR / "meta_judge.jinja"
DEFAULTS = {"judge": DEFAULT_JUDGE_TEMPLATE, "meta_judge": DEFAULT_META_JUDGE_TEMPLATE}
REQUIRED_VARIABLES: dict[str, tuple[str, ...]] = {
    "judge": ("prompt", "response"),
    "meta_judge": ("prompt", "response", "judgement_a", "judgement_b"),
}
Messages = Sequence[dict[str, Any]]


class TemplateError(ValueError):
    """A judge template that cannot be used; the message names the file and what to do."""


def _environment() -> jinja2.Environment:
    # Sandboxed like the chat templates (aligner/models/tokenizer.py); trim/lstrip blocks so that
    # `{% for %}` lines do not leave blank lines; the file's final newline is kept as written.
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                         trim_blocks=True, lstrip_blocks=True, autoescape=False)


@dataclass(frozen=True)
class JudgeTemplate:
    """A loaded, checked template: ``kind`` is ``"judge"`` or ``"meta_judge"``; ``path`` is where it came from."""

    path: Path
    kind: str
    source: str
    _template: jinja2.Template = field(repr=False, compare=False)

    def render(self, **variables: Any) -> str:
        """The prompt text for ``variables``; a variable the template uses but is not given is a TemplateError."""
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as e:
            line = _error_line(e)
            raise TemplateError(f"{self.path}{line}: cannot render the {self.kind} template: {e} (given: "
                                f"{', '.join(sorted(variables)) or 'nothing'}); use only the variables "
                                f"{', '.join(_offered(self.kind))}") from None


def _offered(kind: str) -> tuple[str, ...]:
    return (*REQUIRED_VARIABLES[kind], "messages")


def _error_line(error: Exception) -> str:
    lineno = getattr(error, "lineno", None)
    return f":{lineno}" if lineno else ""


def load_template(path: str | Path | None, kind: str) -> JudgeTemplate:
    """Read, parse and check a ``kind`` template (``"judge"`` or ``"meta_judge"``); ``None`` is the shipped default.

    Raises :class:`TemplateError` when the file is missing or unreadable, has a Jinja syntax error (with
    its line), or never uses one of the variables ``kind`` requires (``judge``: ``prompt``, ``response``;
    ``meta_judge``: also ``judgement_a``, ``judgement_b``).
    """
    if kind not in REQUIRED_VARIABLES:
        raise ValueError(f"unknown judge template kind '{kind}'; use one of {', '.join(REQUIRED_VARIABLES)}")
    file = DEFAULTS[kind] if path is None else Path(path).expanduser()
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "no such file"
        raise TemplateError(f"{file}: {what}; point the {kind} template setting at a Jinja file, or leave it "
                            f"unset to use the built-in {DEFAULTS[kind].name}")
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(f"{file}: cannot read the {kind} template ({e}); save it as a readable UTF-8 "
                            f"text file") from None
    env = _environment()
    try:
        parsed = env.parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{file}:{e.lineno}: Jinja syntax error in the {kind} template: {e.message}; "
                            f"fix the template at that line") from None
    used = jinja2.meta.find_undeclared_variables(parsed)
    missing = [name for name in REQUIRED_VARIABLES[kind] if name not in used]
    if missing:
        needed = ", ".join("{{ " + name + " }}" for name in REQUIRED_VARIABLES[kind])
        raise TemplateError(f"{file}: the {kind} template never uses {', '.join(missing)}; a {kind} template "
                            f"must use {needed} (start from {DEFAULTS[kind]})")
    return JudgeTemplate(path=file, kind=kind, source=source, _template=env.from_string(source))


def _split_prompt(prompt: str | Messages) -> tuple[str, list[dict[str, Any]]]:
    """``(text of the last user turn, whole conversation)`` for a string or message-list prompt."""
    if isinstance(prompt, str):
        return prompt, [{"role": "user", "content": prompt}]
    messages = list(prompt)
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("the prompt is a message list with no user turn; a judge needs the user's question")
    return str(users[-1].get("content", "")), messages


def _check_kind(template: JudgeTemplate, kind: str, caller: str) -> None:
    if template.kind != kind:
        raise TemplateError(f"{template.path}: {caller} needs a {kind} template, got a {template.kind} "
                            f"template; load it with load_template(path, '{kind}')")


def render_judge_prompt(template: JudgeTemplate, prompt: str | Messages, response: str) -> str:
    """The judge's input for one response: ``prompt`` is a string or a chat message list."""
    _check_kind(template, "judge", "render_judge_prompt")
    text, messages = _split_prompt(prompt)
    return template.render(prompt=text, messages=messages, response=response)


def render_meta_judge_prompt(template: JudgeTemplate, prompt: str | Messages, response: str,
                             judgement_a: str, judgement_b: str) -> str:
    """The meta-judge's input: which of two judgements (A, B) of ``response`` is more accurate."""
    _check_kind(template, "meta_judge", "render_meta_judge_prompt")
    text, messages = _split_prompt(prompt)
    return template.render(prompt=text, messages=messages, response=response, judgement_a=judgement_a,
                           judgement_b=judgement_b)
