"""The tokenizer and chat template of a model directory, without ``transformers``.

``load_tokenizer(dir)`` reads ``tokenizer.json`` (the ``tokenizers`` library), the special tokens from
``tokenizer_config.json`` and the Jinja chat template from ``chat_template.jinja`` or
``tokenizer_config.json``, rendered with the same variables and helpers as ``transformers``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes quotes and '<', which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str):
    """A Jinja template in the sandbox, with the options and helpers chat templates rely on."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass
class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` with its special tokens and chat template."""

    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    source: str = ""

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token (None if the model has none)."""
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token; generation stops on it."""
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """Id used for padding: the configured pad token, else the eos token."""
        return self._id(self.pad_token) if self.pad_token is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<|im_start|>``) become their single ids.

        ``add_special_tokens=True`` adds what the tokenizer's post-processor adds (e.g. a BOS); off by
        default because a rendered chat template already contains its special tokens.
        """
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """:meth:`encode` for many texts (parallel inside ``tokenizers``)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self):
        if not self.chat_template:
            raise ValueError(f"{self.source} has no chat template (neither chat_template.jinja nor a chat_template "
                             f"key in tokenizer_config.json); add one or format prompts yourself")
        return compile_chat_template(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            **kwargs: Any) -> str:
        """Render ``messages`` (``[{"role", "content"}, ...]``) as the model's prompt text.

        ``add_generation_prompt`` appends the opening of an assistant turn; extra keyword arguments
        become template variables, as in ``transformers``.
        """
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     pad_token=self.pad_token or "", **kwargs)


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a token as a string or as {"content": ..., ...}.
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(model_dir: str | os.PathLike) -> ChatTokenizer:
    """The :class:`ChatTokenizer` of a Hugging Face model directory."""
    from tokenizers import Tokenizer

    model_dir = Path(model_dir).expanduser()
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found; the model directory needs the fast-tokenizer file "
                                f"tokenizer.json (re-save the tokenizer with transformers, or convert a GGUF file "
                                f"with `aligner convert`)")
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template_file = model_dir / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
    if isinstance(template, list):  # several named templates: the "default" one is the chat template
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return ChatTokenizer(
        tokenizer=Tokenizer.from_file(str(tokenizer_file)),
        chat_template=template,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        pad_token=_token_text(config.get("pad_token")),
        source=str(model_dir),
    )
