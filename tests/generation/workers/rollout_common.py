"""Prompts, settings and the single-process reference shared by the parallel generation tests and their
torchrun worker, so both sides compute exactly the same thing.

The policy is ``tests/wrappers/workers/policy_common.job_config``'s tiny 4-layer GQA model (4 heads, 2 KV
heads: they divide by tp=2), randomly initialised per parameter name, so every layout holds the same weights.
"""
from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "wrappers" / "workers"))
from policy_common import TokenLoss, dp_share, full_weights, job_config, make_batch  # noqa: E402,F401

from aligner.config import GenerationConfig, architecture_dict  # noqa: E402
from aligner.generation.engine import Rollouts, SamplingParams  # noqa: E402
from aligner.generation.torch_engine import TorchEngine  # noqa: E402
from aligner.models import Transformer, config_from_hf  # noqa: E402
from aligner.parallel import seeded_init_  # noqa: E402

# Mixed prompt lengths, two of them odd (a prefill that does not divide by tp under sequence parallelism).
PROMPT_LENGTHS = (3, 9, 1, 6)
MAX_NEW_TOKENS = 8
MAX_BATCH_SIZE = 3  # fewer KV-cache slots than sequences: finished slots take waiting prompts
SAMPLE_SEED = 1234


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def prompt_share(items: list, dp_rank: int, dp_size: int) -> list:
    """Data-parallel rank ``dp_rank``'s contiguous share of ``items``."""
    n = len(items) // dp_size
    return items[dp_rank * n:(dp_rank + 1) * n]


def generation_config() -> GenerationConfig:
    # float32 and no compile: exact comparisons, and no compile time in tests.
    return GenerationConfig(max_batch_size=MAX_BATCH_SIZE, compile=False, dtype="float32")


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)


def seeded(seed: int | None = SAMPLE_SEED) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, n=2, seed=seed)


def reference_model(tied: bool = False, weights: dict[str, torch.Tensor] | None = None) -> Transformer:
    """One process's policy: the same random init as every layout, or the given full ``weights``."""
    cfg = config_from_hf(architecture_dict(job_config(tied=tied).model), source="model")
    model = Transformer(cfg)
    seeded_init_(model, job_config().trainer.seed)
    if weights is not None:
        model.load_state_dict(weights, strict=False)  # a tied PP head's copy loads into the shared weight
    return model.eval()


def reference_rollouts(model: Transformer, items: list[list[int]], sampling: SamplingParams) -> Rollouts:
    """A fresh single-process engine's rollouts."""
    return TorchEngine(model, [eos_id()], max_batch_size=MAX_BATCH_SIZE, dtype="float32").generate(items, sampling)


@lru_cache(maxsize=None)
def eos_id() -> int:
    """An EOS that the untrained model's greedy answers contain, so that some stop early and some do not:
    the 4th greedy token of prompt 1."""
    model = reference_model()
    plain = TorchEngine(model, [0], max_batch_size=MAX_BATCH_SIZE, dtype="float32")
    rollouts = plain.generate(prompts(), SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    return rollouts.response_token_ids[1][3]


def as_dict(r: Rollouts) -> dict:
    """Plain lists (to save with torch.save and compare with ==)."""
    return {"tokens": r.response_token_ids, "logprobs": r.logprobs, "finish": r.finish_reasons,
            "prompts": r.prompt_token_ids}
