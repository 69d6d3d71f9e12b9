"""One self-rewarding round on a batch of prompts: the policy answers, judges its own answers, and the
best-vs-worst responses become DPO pairs; with the meta-judge on, it also compares its own judgements and
the best-vs-worst judgements become pairs that teach judging.

Everything here runs through ``PolicyModel.generate`` (the rollout engine) and the pure functions of
:mod:`aligner.algorithms.self_rewarding` and :mod:`aligner.judges`; nothing about the judge's output can
raise: an unparseable judgement is a missing score, and a prompt without a usable pair is a bad sample.

Sampling is seeded by ``(seed, stage)`` and keyed by each prompt's place in the global batch
(``offset``), so a resumed run, and a run at another data-parallel size, draws the same responses and
judgements.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from aligner.algorithms import (
    PairChoice,
    choose_pair,
    comparison_pairs,
    disagreement,
    elo_ratings,
    meta_judge_pair,
    score_stats,
    wins_from_comparisons,
)
from aligner.generation.cli import response_text
from aligner.generation.engine import Rollouts, SamplingParams
from aligner.judges import parse_score, parse_winner, render_judge_prompt, render_meta_judge_prompt
from aligner.trainers.online_batch import rollout_batch

# Which random stream each kind of generation draws from (the seed of a round is split three ways).
STAGES = {"responses": 0, "judge": 1, "meta_judge": 2}


@dataclass
class JudgedPrompt:
    """One prompt's responses, their judgements and scores, and the pair chosen from them."""

    record_index: int
    prompt: Any  # the record's prompt (text or messages)
    prompt_ids: list[int]
    responses: list[str]
    response_ids: list[list[int]]
    finish_reasons: list[str]
    judge_prompt_ids: list[list[int]]  # [R] the judge prompt of each response
    judgements: list[list[str]]  # [R][E]
    judgement_ids: list[list[list[int]]]  # [R][E]
    scores: list[list[float | None]]  # [R][E]; None: unparsed, out of range, or the judge prompt was too long
    means: list[float | None]
    variances: list[float | None]
    choice: PairChoice

    def record(self) -> dict[str, Any]:
        """The JSON-able summary written to ``pairs/iteration_<k>.jsonl``."""
        c, r = self.choice.chosen, self.choice.rejected
        good = self.choice.bad is None
        return {"kind": "response", "record": self.record_index, "prompt": self.prompt,
                "chosen": self.responses[c] if good else None, "rejected": self.responses[r] if good else None,
                "chosen_score": self.means[c] if good else None, "rejected_score": self.means[r] if good else None,
                "bad": self.choice.bad, "responses": self.responses, "finish_reasons": self.finish_reasons,
                "scores": self.scores, "judgements": self.judgements}


@dataclass
class MetaPair:
    """A pair that teaches judging: the judge prompt, the best and the worst judgement of it."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    summary: dict[str, Any]


@dataclass
class RoundSettings:
    """What a round needs from the config (``self_rewarding`` and ``generation`` sections)."""

    num_responses: int
    num_evals: int
    judge_template: Any
    score_regex: str
    score_low: float
    score_high: float
    judge_max_new_tokens: int
    judge_prefill: str
    max_new_tokens: int
    max_seq_len: int
    temperature: float
    top_k: int
    top_p: float
    stop_token_ids: list[int]
    stop_strings: list[str]
    meta_template: Any = None  # None: no meta-judge
    winner_regex: str = ""
    meta_max_new_tokens: int = 128
    meta_prefill: str = ""
    meta_per_rank: int = 0  # meta-judge pairs this rank may add per round

    def sampling(self, n: int, max_new_tokens: int, seed: int, offset: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              max_new_tokens=max_new_tokens, stop_token_ids=list(self.stop_token_ids),
                              stop_strings=list(self.stop_strings), n=n, seed=seed, prompt_index_offset=offset)


@dataclass
class RoundResult:
    prompts: list[JudgedPrompt]
    meta_pairs: list[MetaPair] = field(default_factory=list)


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one kind of generation within a round."""
    return (seed * 4 + STAGES[stage]) % (1 << 62)


def _texts(rollouts: Rollouts, sampling: SamplingParams, tokenizer: Any) -> list[str]:
    return [response_text(ids, reason, sampling, tokenizer, [tokenizer.eos_id])
            for ids, reason in zip(rollouts.response_token_ids, rollouts.finish_reasons)]


def judge_prompt_ids(texts: list[str], tokenizer: Any, prefill: str) -> list[list[int]]:
    """Judge prompts as the user turn of the chat template, with the judge's reply opened by ``prefill``."""
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) + prefill
             for t in texts]
    return tokenizer.encode_batch(chats)


def _fit(ids: list[list[int]], limit: int) -> tuple[list[list[int]], list[bool]]:
    """Prompts over ``limit`` tokens are replaced by a one-token stand-in (its output is ignored), which
    keeps every prompt's place, and so its random stream, the same as in a run where it fitted."""
    fits = [len(x) <= limit for x in ids]
    return [x if ok else x[:1] for x, ok in zip(ids, fits)], fits


def judge_round(policy: Any, tokenizer: Any, prompts: list[Any], prompt_ids: list[list[int]],
                record_indices: list[int], s: RoundSettings, rho: float, seed: int, offset: int) -> RoundResult:
    """Answer, judge and pair this rank's ``prompts`` (``offset``: the first one's place in the global batch).

    The caller holds the policy in inference mode (``prepare_for_inference``) around this.
    """
    b, R, E = len(prompts), s.num_responses, s.num_evals
    sampling = s.sampling(R, s.max_new_tokens, stage_seed(seed, "responses"), offset)
    rollouts = policy.generate(prompt_ids, sampling)
    texts = _texts(rollouts, sampling, tokenizer)

    judge_texts = [render_judge_prompt(s.judge_template, prompts[i // R], texts[i]) for i in range(b * R)]
    judge_ids, fits = _fit(judge_prompt_ids(judge_texts, tokenizer, s.judge_prefill),
                           s.max_seq_len - s.judge_max_new_tokens)
    judge_sampling = s.sampling(E, s.judge_max_new_tokens, stage_seed(seed, "judge"), offset * R)
    judged = policy.generate(judge_ids, judge_sampling) if judge_ids else None
    # The prefill is part of what the judge said: "Score:" + " 4".
    judgements = [s.judge_prefill + t for t in _texts(judged, judge_sampling, tokenizer)] if judged else []

    out = RoundResult([])
    for p in range(b):
        rows = range(p * R, (p + 1) * R)
        per_response = [judgements[i * E:(i + 1) * E] for i in rows]
        scores = [[parse_score(t, s.score_regex, s.score_low, s.score_high) if fits[i] else None for t in js]
                  for i, js in zip(rows, per_response)]
        means, variances = score_stats(scores)
        lengths = [rollouts.response_lengths[i] for i in rows]
        responses = [texts[i] for i in rows]
        choice = choose_pair(means, variances, lengths, responses, rho)
        out.prompts.append(JudgedPrompt(
            record_index=record_indices[p], prompt=prompts[p], prompt_ids=list(prompt_ids[p]), responses=responses,
            response_ids=[list(rollouts.response_token_ids[i]) for i in rows],
            finish_reasons=[rollouts.finish_reasons[i] for i in rows],
            judge_prompt_ids=[judge_ids[i] for i in rows], judgements=per_response,
            judgement_ids=[[list(judged.response_token_ids[i * E + e]) for e in range(E)] for i in rows],
            scores=scores, means=means, variances=variances, choice=choice))
    if s.meta_template is not None and s.meta_per_rank > 0:
        out.meta_pairs = meta_judge(policy, tokenizer, out.prompts, s, seed, offset)
    return out


def meta_judge(policy: Any, tokenizer: Any, judged: list[JudgedPrompt], s: RoundSettings, seed: int,
               offset: int) -> list[MetaPair]:
    """Meta-rewarding: for the ``s.meta_per_rank`` prompts whose judges disagree most, the response with the
    most disagreement has its judgements compared pairwise (both orders) by the model; an Elo fit of the
    outcomes ranks them and the best-vs-worst judgement becomes a DPO pair on the judge prompt."""
    candidates = []  # (disagreement, prompt position, response index)
    for p, jp in enumerate(judged):
        spread = [disagreement(sc) for sc in jp.scores]
        r = max(range(len(spread)), key=lambda i: (spread[i], -i))
        if spread[r] > 0:
            candidates.append((spread[r], p, r))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    chosen = candidates[:s.meta_per_rank]
    jobs = []  # (candidate, valid judgement indices, ordered comparisons)
    meta_texts: list[str] = []
    for _, p, r in chosen:
        jp = judged[p]
        valid = [e for e, sc in enumerate(jp.scores[r]) if sc is not None]
        pairs = comparison_pairs(len(valid))
        jobs.append((p, r, valid, pairs))
        for a, b in pairs:
            meta_texts.append(render_meta_judge_prompt(s.meta_template, jp.prompt, jp.responses[r],
                                                       jp.judgements[r][valid[a]], jp.judgements[r][valid[b]]))
    if not meta_texts:
        return []
    meta_ids, fits = _fit(judge_prompt_ids(meta_texts, tokenizer, s.meta_prefill),
                          s.max_seq_len - s.meta_max_new_tokens)
    # Comparisons per rank are at most meta_per_rank * E * (E - 1) <= b * E^2: ranks' key ranges stay apart.
    sampling = s.sampling(1, s.meta_max_new_tokens, stage_seed(seed, "meta_judge"), offset * s.num_evals ** 2)
    verdicts = [s.meta_prefill + t for t in _texts(policy.generate(meta_ids, sampling), sampling, tokenizer)]
    out: list[MetaPair] = []
    at = 0
    for p, r, valid, pairs in jobs:
        winners = [parse_winner(verdicts[at + i], s.winner_regex) if fits[at + i] else None
                   for i in range(len(pairs))]
        at += len(pairs)
        ratings = elo_ratings(wins_from_comparisons(len(valid), pairs, winners))
        best_worst = meta_judge_pair(ratings)
        if best_worst is None:
            continue
        jp = judged[p]
        best, worst = valid[best_worst[0]], valid[best_worst[1]]
        if jp.judgements[r][best].strip() == jp.judgements[r][worst].strip():
            continue
        out.append(MetaPair(
            prompt_ids=jp.judge_prompt_ids[r], chosen_ids=jp.judgement_ids[r][best],
            rejected_ids=jp.judgement_ids[r][worst],
            summary={"kind": "meta_judge", "record": jp.record_index, "prompt": jp.prompt,
                     "response": jp.responses[r], "chosen": jp.judgements[r][best],
                     "rejected": jp.judgements[r][worst], "ratings": [round(float(x), 3) for x in ratings],
                     "winners": winners}))
    return out


def pair_batch(result: RoundResult, meta_slots: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The DPO batch of a round: interleaved chosen/rejected rows (``rows_per_example = 2``), the response
    pairs first, then ``meta_slots`` meta-judge pairs. Bad samples and empty meta slots keep their rows
    (every rank runs the same shapes) with no label, so they carry no loss and count in no metric."""
    prompts, responses, valid = [], [], []
    for jp in result.prompts:
        good = jp.choice.bad is None
        c, r = (jp.choice.chosen, jp.choice.rejected) if good else (0, 0)
        prompts += [jp.prompt_ids, jp.prompt_ids]
        responses += [jp.response_ids[c], jp.response_ids[r]]
        valid.append(good and bool(jp.response_ids[c]) and bool(jp.response_ids[r]))
    filler = result.prompts[0]
    for i in range(meta_slots):
        if i < len(result.meta_pairs):
            m = result.meta_pairs[i]
            prompts += [m.prompt_ids, m.prompt_ids]
            responses += [m.chosen_ids, m.rejected_ids]
            valid.append(bool(m.chosen_ids) and bool(m.rejected_ids))
        else:
            prompts += [filler.prompt_ids, filler.prompt_ids]
            responses += [filler.response_ids[0], filler.response_ids[0]]
            valid.append(False)
    rows = Rollouts(prompt_token_ids=prompts, response_token_ids=responses,
                    logprobs=[[0.0] * len(x) for x in responses], finish_reasons=["eos"] * len(responses))
    batch = rollout_batch(rows, pad_id)
    del batch["engine_logps"]
    invalid = torch.tensor([not v for v in valid]).repeat_interleave(2)
    batch["labels"][invalid] = -100
    return batch
