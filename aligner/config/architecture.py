"""The architecture a ``model`` section describes, as a Hugging Face ``config.json`` dict.

Feed the result to ``aligner.models.config_from_hf`` to get a ``TransformerConfig``; this module stays
free of ``aligner.models`` (config sits below models in the import order).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from aligner.config.schema import ArchConfig, ModelConfig

# Sizes an inline ``arch`` must agree on with a checkpoint's config.json when both are given.
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads")


def arch_to_hf_dict(arch: ArchConfig) -> dict[str, Any]:
    """The keys of ``arch`` that are set (``null`` means the family default, so it is left out)."""
    return {k: v for k, v in dataclasses.asdict(arch).items() if v is not None}


def architecture_dict(model: ModelConfig, section: str = "model") -> dict[str, Any]:
    """HF config dict for ``model``: the checkpoint's ``config.json`` when ``model.path`` holds one,
    else the inline ``model.arch``; when both exist their sizes must agree.

    ``section`` is the config key of ``model`` (``"ppo.reward_model"``), used in error messages.
    """
    config_json = Path(model.path) / "config.json" if model.path else None
    if config_json is not None and config_json.is_file():
        hf = json.loads(config_json.read_text())
        if model.arch is not None:
            inline = arch_to_hf_dict(model.arch)
            for key in _SIZE_KEYS:
                if key in inline and key in hf and inline[key] != hf[key]:
                    raise ValueError(
                        f"{section}.arch.{key}={inline[key]} disagrees with {key}={hf[key]} in {config_json}; "
                        f"pass {section}.arch=null to let the checkpoint decide, or point {section}.path elsewhere")
        return hf
    if model.arch is not None:
        return arch_to_hf_dict(model.arch)
    if model.path:
        raise FileNotFoundError(
            f"{section}.path={model.path} has no config.json and {section}.arch is not set; give a Hugging Face "
            f"checkpoint directory, or an architecture with {section}=<size> (see conf/model/)")
    raise ValueError(f"{section} has neither a path nor an arch; set {section}.path to a checkpoint directory "
                     f"or choose a size with {section}=<name of a file in conf/model/>")
