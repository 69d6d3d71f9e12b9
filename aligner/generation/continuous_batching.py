"""Continuous batching for the built-in engine: one ``generate`` call's slots, steps and results.

Samples wait in a queue; free KV-cache slots take them (a prefill), a decode step advances every slot
by one token, and every ``sync_every`` steps the host reads one small tensor to learn which rows
finished (EOS, a stop token, the length limit, or a token that could complete a stop string, which
is then checked on the decoded text), collects them and refills their slots. Everything a step needs
stays on the device; the host only tracks which slot holds which sample and a bound on its length.
"""
from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

import torch

from aligner.generation.engine import Rollouts, SamplingParams
from aligner.generation.sampling import sequence_keys

if TYPE_CHECKING:
    from aligner.generation.torch_engine import TorchEngine

_REASONS = {1: "eos", 2: "stop", 3: "length"}
_WINDOW_ROUND = 64  # decode attends over the longest row's length rounded up to this (few distinct shapes)
_PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward (bounds its activation memory)


class ContinuousBatch:
    """One ``generate`` call: slots, the device-side state of each row, admission, decode steps, collection."""

    def __init__(self, engine: TorchEngine, prompts: list[list[int]], sampling: SamplingParams):
        self.engine, self.prompts, self.sp = engine, prompts, sampling
        B, dev = engine.slots, engine.device  # the cache rows this call's engine allocated
        self.items = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        self.waiting = deque(range(len(self.items)))
        self.results: list[tuple[list[int], list[float], str] | None] = [None] * len(self.items)
        self.slot_item: list[int | None] = [None] * B
        self.slot_end: list[int] = [0] * B  # bound on each occupied slot's next write position + 1
        self.checked = [0] * B  # response tokens already searched for stop strings
        # Unseeded calls draw their seed from torch's default generator (so torch.manual_seed applies).
        self.seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item())
        eos = [] if sampling.ignore_eos else engine.eos_ids
        self.eos_ids = torch.tensor(eos, dtype=torch.long, device=dev)
        self.stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=dev)
        ends = sorted(set(eos) | set(sampling.stop_token_ids))
        # Settings that pick a code path are Python values (one compiled graph each); values that only
        # enter arithmetic are 0-d tensors, so changing them reuses the graph.
        self.sample_kwargs = dict(
            top_k=sampling.top_k, greedy=sampling.greedy,
            suppress_ids=torch.tensor(ends, dtype=torch.long, device=dev) if sampling.min_new_tokens and ends else None)
        self.scalars = (torch.tensor(1.0 if sampling.greedy else sampling.temperature, device=dev),
                        torch.tensor(sampling.top_p, device=dev) if sampling.top_p < 1.0 else 1.0,
                        torch.tensor(sampling.min_new_tokens, device=dev))
        self.stop_candidates = self._stop_candidates() if sampling.stop_strings else None
        # Device state of each slot. out_* have one spare column that idle rows scribble into.
        W = sampling.max_new_tokens + 1
        self.out_tokens = torch.zeros(B, W, dtype=torch.long, device=dev)
        self.out_logprobs = torch.zeros(B, W, dtype=torch.float32, device=dev)
        self.last = torch.zeros(B, dtype=torch.long, device=dev)
        self.prompt_len = torch.ones(B, dtype=torch.long, device=dev)
        self.gen_len = torch.zeros(B, dtype=torch.long, device=dev)
        self.keys = torch.zeros(B, dtype=torch.long, device=dev)
        self.live = torch.zeros(B, dtype=torch.bool, device=dev)
        self.reason = torch.zeros(B, dtype=torch.long, device=dev)
        self.maybe_stop = torch.zeros(B, dtype=torch.bool, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.cache_len = engine.cache_len
        self.window_positions = torch.arange(self.cache_len, device=dev)

    def loop(self) -> None:
        """Run until every sample has finished: admit into free slots, else decode; then collect."""
        while self.waiting or any(s is not None for s in self.slot_item):
            free = [s for s, item in enumerate(self.slot_item) if item is None]
            if self.waiting and free:
                self.admit(free)
            else:
                for _ in range(self.engine.sync_every):
                    self.decode()
            self.collect()

    # -------------------------------------------------------------- device steps
    def admit(self, free: list[int]) -> None:
        """Prefill waiting samples into free slots and draw their first tokens."""
        take = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        slots = free[:len(take)]
        for s, item in zip(slots, take):
            self.slot_item[s], self.checked[s] = item, 0
            self.slot_end[s] = len(self.prompts[self.items[item][0]]) + 1
        dev = self.engine.device
        slots_t = torch.tensor(slots, device=dev)
        prompt_idx = torch.tensor([self.items[i][0] for i in take], device=dev)
        sample_idx = torch.tensor([self.items[i][1] for i in take], device=dev)
        self.keys[slots_t] = sequence_keys(self.seed, prompt_idx + self.sp.prompt_index_offset, sample_idx)
        self.gen_len[slots_t] = 0
        self.reason[slots_t] = 0
        self.live[slots_t] = True
        self.prompt_len[slots_t] = torch.tensor([len(self.prompts[self.items[i][0]]) for i in take], device=dev)
        logits = self._prefill(slots, [self.items[i][0] for i in take])  # [b, V]
        tokens, logps = self.engine.sample(logits, self.keys[slots_t], self.gen_len[slots_t], *self.scalars,
                                            **self.sample_kwargs)
        stepping = torch.zeros_like(self.live)
        stepping[slots_t] = True
        full_tokens, full_logps = self.last.clone(), torch.zeros_like(self.out_logprobs[:, 0])
        full_tokens[slots_t], full_logps[slots_t] = tokens, logps
        self.record(full_tokens, full_logps, stepping)

    def _prefill(self, slots: list[int], prompt_ids: list[int]) -> torch.Tensor:
        """Logits ``[b, V]`` after each slot's prompt; one forward per distinct prompt, in chunks."""
        dev = self.engine.device
        first: dict[int, int] = {}  # prompt -> the slot that computes it
        for s, p in zip(slots, prompt_ids):
            first.setdefault(p, s)
        unique = list(first)
        logits_of: dict[int, torch.Tensor] = {}
        start = 0
        while start < len(unique):
            T = len(self.prompts[unique[start]])
            end = start + 1
            while end < len(unique) and (end - start + 1) * max(T, len(self.prompts[unique[end]])) <= _PREFILL_TOKENS:
                T = max(T, len(self.prompts[unique[end]]))
                end += 1
            chunk = unique[start:end]
            tokens = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, p in enumerate(chunk):
                tokens[r, :len(self.prompts[p])] = torch.tensor(self.prompts[p])
            last = torch.tensor([len(self.prompts[p]) - 1 for p in chunk], device=dev)
            rows = torch.tensor([first[p] for p in chunk], device=dev)
            out = self.engine.prefill_logits(tokens.to(dev), rows, last)
            for r, p in enumerate(chunk):
                logits_of[p] = out[r]
            start = end
        copies = [(first[p], s) for s, p in zip(slots, prompt_ids) if first[p] != s]
        if copies:
            src = torch.tensor([c[0] for c in copies], device=dev)
            dst = torch.tensor([c[1] for c in copies], device=dev)
            longest = max(len(self.prompts[p]) for p in prompt_ids)
            self.engine.copy_cache_rows(src, dst, longest)
        return torch.stack([logits_of[p] for p in prompt_ids])

    def decode(self) -> None:
        """One decode step of every slot (the compiled part), then its bookkeeping."""
        positions = self.prompt_len + self.gen_len - 1  # where the last token goes
        longest = max(end for end, item in zip(self.slot_end, self.slot_item) if item is not None)
        window = self.window_positions[:min(math.ceil(longest / _WINDOW_ROUND) * _WINDOW_ROUND, self.cache_len)]
        if self.engine.compile:
            torch._dynamo.mark_dynamic(window, 0)
        tokens, logps = self.engine.decode(self.last, positions, window, self.keys, self.gen_len, *self.scalars,
                                            **self.sample_kwargs)
        self.record(tokens, logps, self.live)
        for s, item in enumerate(self.slot_item):
            if item is not None:
                self.slot_end[s] += 1

    def record(self, tokens: torch.Tensor, logps: torch.Tensor, stepping: torch.Tensor) -> None:
        """Append ``tokens, logps [B]`` to the rows where ``stepping``; mark rows that finished."""
        # Rows not stepping write into the column after their end, which nothing reads.
        self.out_tokens[self.rows, self.gen_len] = tokens
        self.out_logprobs[self.rows, self.gen_len] = logps
        self.gen_len += stepping
        self.last = torch.where(stepping, tokens, self.last)
        code = torch.where(torch.isin(tokens, self.eos_ids), 1,
                           torch.where(torch.isin(tokens, self.stop_ids), 2,
                                       torch.where(self.gen_len >= self.sp.max_new_tokens, 3, 0)))
        finished = stepping & (code > 0)
        self.reason = torch.where(finished, code, self.reason)
        self.live &= ~finished
        if self.stop_candidates is not None:
            self.maybe_stop |= stepping & self.stop_candidates[tokens]

    # -------------------------------------------------------------- host side
    def collect(self) -> None:
        """The per-check host sync: take finished rows off their slots."""
        live, maybe, gen_len, reason = torch.stack(
            [self.live.long(), self.maybe_stop.long(), self.gen_len, self.reason]).tolist()
        done: dict[int, tuple[int, str]] = {}  # slot -> (response length, finish reason)
        if self.stop_candidates is not None and any(maybe):
            self.maybe_stop.zero_()
            for s, flag in enumerate(maybe):
                if flag and self.slot_item[s] is not None:
                    cut = self._find_stop_string(s, gen_len[s])
                    if cut is not None:
                        done[s] = (cut, "stop")
                        self.live[s] = False
        for s, item in enumerate(self.slot_item):
            if item is not None and not live[s] and s not in done:
                done[s] = (gen_len[s], _REASONS[reason[s]])
        if not done:
            return
        slots = sorted(done)
        idx = torch.tensor(slots, device=self.engine.device)
        width = max(done[s][0] for s in slots)
        tokens = self.out_tokens[idx, :width].tolist()
        logps = self.out_logprobs[idx, :width].tolist()
        for r, s in enumerate(slots):
            length, why = done[s]
            self.results[self.slot_item[s]] = (tokens[r][:length], logps[r][:length], why)
            self.slot_item[s] = None

    def _stop_candidates(self) -> torch.Tensor:
        """``[V]`` bool: tokens whose text could complete one of the stop strings."""
        ends = {s[-1] for s in self.sp.stop_strings if s}
        texts = self.engine.token_texts()
        if any(c.isspace() for c in ends):  # decoders may drop a token's leading space: check every token
            flags = [True] * len(texts)
        else:
            flags = [any(c in t for c in ends) or "\ufffd" in t for t in texts]
        return torch.tensor(flags, dtype=torch.bool, device=self.engine.device)

    def _find_stop_string(self, slot: int, length: int) -> int | None:
        """Response length up to the token that completes the first stop string, or None."""
        stops = [s for s in self.sp.stop_strings if s]
        ids = self.out_tokens[slot, :length].tolist()
        # Decode from a margin before the unchecked part, wide enough to hold any stop string.
        start = max(0, self.checked[slot] - 4 * max(map(len, stops)) - 8)
        decode = self.engine.tokenizer.decode

        def has_stop(end: int) -> bool:
            text = decode(ids[start:end], skip_special_tokens=True)
            return any(s in text for s in stops)

        if not has_stop(length):
            self.checked[slot] = length
            return None
        lo, hi = max(start, self.checked[slot]), length  # has_stop(lo) is False, has_stop(hi) is True
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(mid) else (mid, hi)
        return hi

    def rollouts(self) -> Rollouts:
        """The finished samples, prompt-major (sample j of prompt i is row i * n + j)."""
        return Rollouts(
            prompt_token_ids=[list(self.prompts[i]) for i, _ in self.items],
            response_token_ids=[r[0] for r in self.results],
            logprobs=[r[1] for r in self.results],
            finish_reasons=[r[2] for r in self.results],
        )
