"""The rollout-engine interface every backend implements, with its sampling settings and results.

Backends: the built-in KV-cache engine (``torch_engine.py``, the default; runs on the training
weights with no copy) and TensorRT-LLM (``trtllm_engine.py``, optional, GPU container only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class SamplingParams:
    """How to sample. The defaults are pure sampling, as RL training needs (see ``docs/generation.md``):
    top-k, top-p and a minimum length change the distribution the tokens come from, so the policy's
    log-probs of them no longer match, and the KL estimate can turn negative."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # 0 = off; EOS and stop tokens are masked until this many tokens exist
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS
    stop_strings: list[str] = field(default_factory=list)  # checked on the decoded response text
    n: int = 1  # samples per prompt
    seed: int | None = None  # None: unseeded; an int makes every sample reproducible
    ignore_eos: bool = False  # generate max_new_tokens regardless of EOS (benchmarks)
    # Position of the first prompt in a larger batch that data-parallel ranks split: a seeded share then draws
    # exactly what one process generating the whole batch would (the random stream is keyed by prompt index).
    prompt_index_offset: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1] (1.0 = off)"),
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens={self.max_new_tokens}]"),
            (self.n >= 1, f"n={self.n} must be >= 1"),
            (self.prompt_index_offset >= 0, f"prompt_index_offset={self.prompt_index_offset} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"generation: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def changes_distribution(self) -> bool:
        """Whether tokens are drawn from something other than softmax(logits / temperature)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_new_tokens > 0


@dataclass
class Rollouts:
    """Results of one ``generate`` call: ``len(prompts) * n`` samples, prompt-major (sample j of
    prompt i is row ``i * n + j``)."""

    prompt_token_ids: list[list[int]]  # the prompt of each sample (repeated n times)
    response_token_ids: list[list[int]]  # generated tokens, EOS/stop token included when one ended it
    logprobs: list[list[float]]  # log-prob of each generated token under softmax(logits / temperature)
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    response_lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.response_lengths:
            self.response_lengths = [len(r) for r in self.response_token_ids]

    def __len__(self) -> int:
        return len(self.response_token_ids)

    def padded(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(responses ``[N, L]`` right-padded with ``pad_id``, logprobs ``[N, L]`` zero-padded, mask ``[N, L]``)."""
        width = max(1, max(self.response_lengths, default=1))
        tokens = torch.full((len(self), width), pad_id, dtype=torch.long)
        logps = torch.zeros((len(self), width), dtype=torch.float32)
        mask = torch.zeros((len(self), width), dtype=torch.bool)
        for i, (ids, lp) in enumerate(zip(self.response_token_ids, self.logprobs)):
            tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logps[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
            mask[i, :len(ids)] = True
        return tokens, logps, mask


class GenerationEngine(Protocol):
    """What trainers and ``aligner generate`` call; see ``docs/generation.md``."""

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> Rollouts:
        """Sample ``sampling.n`` responses for each prompt (token ids in, token ids and log-probs out)."""
        ...

    def update_weights(self, model: torch.nn.Module | None = None) -> None:
        """Refit after an optimizer step: the next ``generate`` uses the model's current weights."""
        ...

    def offload(self) -> None:
        """Release the engine's device memory (KV cache, engine-owned weights) for training."""
        ...

    def onload(self) -> None:
        """Re-acquire what ``offload`` released."""
        ...

    def close(self) -> None:
        """Free everything; the engine cannot be used afterwards."""
        ...


NEGATIVE_KL_WARNING = (
    "{context}: sampling with {changes} draws rollout tokens from a distribution other than the policy's "
    "softmax(logits / temperature), which the training forward scores. The policy's log-probs of those tokens "
    "then no longer match, and the KL penalty can turn negative: the policy learns to exploit the sampler "
    "instead of the reward (the training FAQ in docs/generation.md: use top_k=0, top_p=1.0, min_new_tokens=0 "
    "for RL rollouts)."
)


def warn_if_distribution_changed(sampling: "SamplingParams", context: str) -> bool:
    """Log the negative-KL warning (on rank 0) when a training job's rollouts use top-k, top-p or a minimum
    length; trainers call it once at start-up. Returns whether the settings change the distribution.

    ``sampling`` is a :class:`SamplingParams` or anything with its fields (``GenerationConfig``); ``context``
    names the job in the message (``"ppo"``).
    """
    import logging
    import os

    changes = [name for name, on in (("top_k", sampling.top_k > 0), ("top_p", sampling.top_p < 1.0),
                                     ("min_new_tokens", sampling.min_new_tokens > 0)) if on]
    if changes and os.environ.get("RANK", "0") == "0":
        described = ", ".join(f"{name}={getattr(sampling, name)}" for name in changes)
        message = NEGATIVE_KL_WARNING.format(context=context, changes=described)
        logging.getLogger("aligner.generation").warning(message)
    return bool(changes)
