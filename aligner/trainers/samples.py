"""Sample tables at validation: greedy responses of the current policy to a few held-out prompts.

Generation here is a plain greedy loop over ``Alignable.forward`` (one full forward per new token),
so it works at every parallel layout; it is for a handful of prompts, not for rollouts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from aligner.interface import Alignable
from aligner.logging import format_sample_table, save_samples


def _next_token(logits, batch) -> torch.Tensor:
    last = logits[:, -1]  # [B, V]; vocab-sharded under TP
    if hasattr(last, "full_tensor"):
        last = last.full_tensor()
    return last.argmax(-1)


@torch.no_grad()
def greedy_responses(policy: Alignable, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy replies to chat ``prompts`` (message lists), stopping at EOS or ``max_new_tokens``."""
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer.encode(t) for t in texts]
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    out: list[list[int]] = [[] for _ in ids]
    done = [False] * len(ids)
    policy.prepare_for_inference()
    for _ in range(max_new_tokens):
        rows = [a + b for a, b in zip(ids, out)]
        width = max(len(r) for r in rows)
        # Left padding keeps every row's last token at the end, where the next token is read.
        tokens = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        nxt = policy.forward({"tokens": tokens, "attention_mask": mask}, _next_token)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t == eos:
                    done[i] = True
                else:
                    out[i].append(t)
        if all(done):
            break
    policy.finish_inference()
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


class SampleTable:
    """Prints the prompt | response table and saves it under ``samples/`` (rank 0 only)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.output_dir, self.enabled = Path(output_dir), enabled

    def add(self, step: int, prompts: list[list[dict]], responses: list[str]) -> None:
        if not self.enabled:
            return
        rows = [(p[-1]["content"], r) for p, r in zip(prompts, responses)]
        print(f"\nsamples at step {step}\n" + format_sample_table(rows, headers=("prompt", "response")), flush=True)
        save_samples(self.output_dir, step, rows, headers=("prompt", "response"))
