"""Self-rewarding and meta-rewarding DPO: the policy is its own LLM judge.

    python examples/train_self_rewarding.py [overrides]      # same as: aligner train self_rewarding [overrides]

For ``self_rewarding.max_iterations`` iterations, each ``trainer.max_epochs`` passes over the prompts: every
step takes ``trainer.global_batch_size`` prompts (split over data-parallel ranks), samples
``num_responses_to_gen`` responses to each, has the same model judge each response ``num_evals_to_average``
times with the judge template, and trains one DPO step on the highest- vs lowest-scored responses
(:mod:`aligner.trainers.judging`). The reference policy is the initial model in the first iteration and the
policy at the end of the previous iteration after that. Steps build on each other online (each step's
responses come from the current policy), as in NeMo-Aligner.

Every step's pairs (and bad samples, with the reason) are appended to ``pairs/iteration_<k>.jsonl``. A
checkpoint holds the policy, the reference weights, the sampler and the pairs of the running iteration;
resuming rewrites that iteration's file from it, so the file matches the run that continues.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from aligner.algorithms import BAD_REASONS, length_control_at
from aligner.config import load_config
from aligner.data import ResumableDistributedSampler
from aligner.judges import load_template
from aligner.logging import format_sample_table, save_samples
from aligner.models.fetch import resolve_model_path
from aligner.models.tokenizer import load_tokenizer
from aligner.parallel.collectives import gather_objects, sum_over
from aligner.trainers.judging import RoundResult, RoundSettings, judge_round, pair_batch
from aligner.trainers.loop import Hooks, run_training, start_run
from aligner.trainers.online_batch import build_prompt_data
from aligner.trainers.preference_losses import PairLoss
from aligner.trainers.reference import SwappedReference
from aligner.trainers.sft import validation_share
from aligner.wrappers import PolicyModel

META_JUDGE_PCNT_WARN = 0.15  # the pull request saw the judge collapse to always scoring 5 above this
PAIRS_DIR = "pairs"


class PairLog:
    """``pairs/iteration_<k>.jsonl``: every step's judged prompts and meta-judge pairs (rank 0 writes)."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.dir, self.enabled = Path(output_dir) / PAIRS_DIR, enabled

    def path(self, iteration: int) -> Path:
        return self.dir / f"iteration_{iteration}.jsonl"

    def append(self, iteration: int, records: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path(iteration), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def restore(self, iteration: int, records: list[dict[str, Any]]) -> None:
        """After a resume: this iteration's file holds exactly the checkpoint's pairs; later ones go."""
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path(iteration).with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, self.path(iteration))
        for later in self.dir.glob("iteration_*.jsonl"):
            if int(later.stem.split("_")[1]) > iteration:
                later.unlink()


class SelfRewardingBatches:
    """The loop's batch source: prompt indices from the resumable sampler, plus the pairs generated so far
    in the running iteration, which go into every checkpoint with the sampler's position."""

    def __init__(self, sampler: ResumableDistributedSampler, log: PairLog, steps_per_iteration: int):
        self.sampler, self.log, self.steps_per_iteration = sampler, log, steps_per_iteration
        self.steps_per_epoch = sampler.steps_per_epoch
        self.pairs: list[dict[str, Any]] = []
        self.step = 0  # the last step whose pairs were added

    def next_batch(self) -> list[int]:
        return self.sampler.next_batch()

    def add(self, step: int, records: list[dict[str, Any]]) -> None:
        self.step = step
        iteration = (step - 1) // self.steps_per_iteration
        records = [{"step": step, "iteration": iteration, **r} for r in records]
        self.pairs.extend(records)
        self.log.append(iteration, records)
        if step % self.steps_per_iteration == 0:
            self.pairs = []  # the iteration is complete on disk; the next one starts empty

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "pairs": list(self.pairs), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.pairs, self.step = list(state["pairs"]), state["step"]
        # The iteration the next step runs in; its pairs so far are the checkpoint's (none at a boundary).
        self.log.restore(self.step // self.steps_per_iteration, self.pairs)


def check_settings(sr: Any, gbs: int, dp: int, iterations: int) -> list[str]:
    """Validate the ``self_rewarding`` section; returns warnings to print. Raises ValueError naming the key."""
    if sr.num_responses_to_gen < 2:
        raise ValueError(f"self_rewarding.num_responses_to_gen={sr.num_responses_to_gen}: a pair needs at least 2 "
                         f"responses per prompt")
    if sr.num_evals_to_average < 1:
        raise ValueError(f"self_rewarding.num_evals_to_average={sr.num_evals_to_average} must be >= 1")
    if sr.judge_score_low >= sr.judge_score_high:
        raise ValueError(f"self_rewarding.judge_score_low={sr.judge_score_low} must be below "
                         f"judge_score_high={sr.judge_score_high}")
    for k in range(iterations):
        try:
            length_control_at(sr.length_control, k)
        except (TypeError, ValueError) as e:
            raise ValueError(f"self_rewarding.length_control={sr.length_control!r}: {e}; give a number in [0, 1) "
                             f"or one per iteration, e.g. [0, 0, 0.1]") from None
    warnings = []
    if sr.use_meta_judge:
        if not 0 < sr.meta_judge_pcnt <= 1:
            raise ValueError(f"self_rewarding.meta_judge_pcnt={sr.meta_judge_pcnt} must be in (0, 1]")
        if int(sr.meta_judge_pcnt * gbs) // dp < 1:
            raise ValueError(f"self_rewarding.meta_judge_pcnt={sr.meta_judge_pcnt} of trainer.global_batch_size="
                             f"{gbs} over {dp} data-parallel ranks leaves no meta-judge pair per rank; raise one of "
                             f"them (at least {math.ceil(dp / gbs * 100) / 100} of the batch)")
        if sr.meta_judge_pcnt > META_JUDGE_PCNT_WARN:
            warnings.append(f"self_rewarding.meta_judge_pcnt={sr.meta_judge_pcnt} is above "
                            f"{META_JUDGE_PCNT_WARN}: NeMo-Aligner saw the judge collapse to scoring every response "
                            f"5 above that; keep it <= {META_JUDGE_PCNT_WARN}")
    return warnings


def round_sums(result: RoundResult, keep: list[bool]) -> dict[str, float]:
    """This rank's counts and sums of a round (``keep``: the prompts that count, False for fillers)."""
    sums = {"prompts": 0.0, "good": 0.0, "responses": 0.0, "length_ends": 0.0, "chosen_score": 0.0,
            "rejected_score": 0.0, "chosen_length": 0.0, "rejected_length": 0.0,
            "meta_pairs": float(len(result.meta_pairs)), **{f"bad/{r}": 0.0 for r in BAD_REASONS}}
    for jp, k in zip(result.prompts, keep):
        if not k:
            continue
        sums["prompts"] += 1
        sums["responses"] += len(jp.responses)
        sums["length_ends"] += sum(f == "length" for f in jp.finish_reasons)
        if jp.choice.bad is not None:
            sums[f"bad/{jp.choice.bad}"] += 1
            continue
        c, r = jp.choice.chosen, jp.choice.rejected
        sums["good"] += 1
        sums["chosen_score"] += jp.means[c]
        sums["rejected_score"] += jp.means[r]
        sums["chosen_length"] += len(jp.response_ids[c])
        sums["rejected_length"] += len(jp.response_ids[r])
    return sums


def round_metrics(policy: PolicyModel, sums: dict[str, float], prefix: str) -> dict[str, float]:
    """Global (all data-parallel ranks) round metrics, named as NeMo-Aligner logs them."""
    names = sorted(sums)
    totals = sum_over(torch.tensor([sums[n] for n in names], dtype=torch.float64), policy.pmesh["dp"])
    t = {n: float(v) for n, v in zip(names, totals)}
    good, prompts = max(t["good"], 1.0), max(t["prompts"], 1.0)
    bad = sum(t[f"bad/{r}"] for r in BAD_REASONS)
    out = {
        f"{prefix}/chosen_generated_rewards": t["chosen_score"] / good if t["good"] else math.nan,
        f"{prefix}/rejected_generated_rewards": t["rejected_score"] / good if t["good"] else math.nan,
        f"{prefix}/bad_samples_per_GBS": bad / prompts,
        f"{prefix}/bad_ends_per_GBS": t["length_ends"] / max(t["responses"], 1.0),
        f"{prefix}/chosen_lengths": t["chosen_length"] / good if t["good"] else math.nan,
        f"{prefix}/rejected_lengths": t["rejected_length"] / good if t["good"] else math.nan,
        f"{prefix}/pairs": t["good"],
        f"{prefix}/meta_judge_pairs": t["meta_pairs"],
    }
    out.update({f"{prefix}/bad_samples/{r}": t[f"bad/{r}"] for r in BAD_REASONS})
    return out


def dpo_metrics(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The DPO step's metrics under NeMo-Aligner's names (``rewards_chosen_mean``: beta * log-ratio)."""
    names = {"loss": "loss", "preference_loss": "preference_loss", "sft_loss": "sft_loss",
             "rewards/chosen": "rewards_chosen_mean", "rewards/rejected": "rewards_rejected_mean",
             "rewards/accuracies": "rewards/accuracies", "rewards/margins": "rewards/margins",
             "logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected", "grad_norm": "grad_norm", "lr": "lr"}
    return {f"{prefix}/{new}": metrics[old] for old, new in names.items() if old in metrics}


def train_self_rewarding(cfg) -> dict[str, float]:
    """Run self-rewarding (meta-rewarding with ``use_meta_judge``) training; returns the last metrics."""
    sr = cfg.self_rewarding
    if not cfg.model.path:
        raise ValueError("model.path is not set: self-rewarding needs a checkpoint directory with a tokenizer "
                         "(e.g. model.path=smollm2-135m-instruct, the embedded model)")
    # Templates are read and checked before any model loads, so a bad file fails in seconds.
    judge_template = load_template(sr.judge_template, "judge")
    meta_template = load_template(sr.meta_judge_template, "meta_judge") if sr.use_meta_judge else None
    run = start_run(cfg)
    dp = run.pmesh.dims.dp
    gbs = cfg.trainer.global_batch_size
    if gbs % dp:
        raise ValueError(f"trainer.global_batch_size={gbs} prompts do not split over {dp} data-parallel ranks")
    for warning in check_settings(sr, gbs, dp, sr.max_iterations):
        run.print(f"warning: {warning}")
    model_dir = str(resolve_model_path(cfg.model.path))
    cfg.model.path = model_dir
    tokenizer = load_tokenizer(model_dir)
    max_new = cfg.generation.max_new_tokens
    prompts = build_prompt_data(cfg.data.train, tokenizer, cfg.trainer.max_seq_len - max_new, cfg.data.overlong)
    run.print(f"prompts: {prompts.describe()}")
    val_prompts = None
    if cfg.data.validation:
        val_prompts = build_prompt_data(cfg.data.validation, tokenizer, cfg.trainer.max_seq_len - max_new,
                                        cfg.data.overlong)
        run.print(f"validation prompts: {val_prompts.describe()}")

    policy = PolicyModel(cfg, run.pmesh)
    policy.configure_generation(cfg.generation, tokenizer)
    sampler = ResumableDistributedSampler(len(prompts), policy.dp_rank, policy.dp_size, gbs, seed=cfg.trainer.seed)
    # An iteration is trainer.max_epochs passes over the prompts; trainer.max_steps > 0 caps the whole run.
    steps_per_iteration = sampler.steps_per_epoch * cfg.trainer.max_epochs
    total = steps_per_iteration * sr.max_iterations
    if cfg.trainer.max_steps > 0:
        total = min(total, cfg.trainer.max_steps)
    g = cfg.generation
    settings = RoundSettings(
        num_responses=sr.num_responses_to_gen, num_evals=sr.num_evals_to_average, judge_template=judge_template,
        score_regex=sr.judge_score_regex, score_low=sr.judge_score_low, score_high=sr.judge_score_high,
        judge_max_new_tokens=sr.judge_max_new_tokens, judge_prefill=sr.judge_prefill, max_new_tokens=max_new, max_seq_len=cfg.trainer.max_seq_len,
        temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, stop_token_ids=list(g.stop_token_ids),
        stop_strings=list(g.stop_strings), meta_template=meta_template, winner_regex=sr.meta_judge_winner_regex,
        meta_max_new_tokens=sr.meta_judge_max_new_tokens, meta_prefill=sr.meta_judge_prefill,
        meta_per_rank=int(sr.meta_judge_pcnt * gbs) // dp if sr.use_meta_judge else 0)
    reference = SwappedReference(policy)
    loss_fn = PairLoss("dpo", _DPOSection(sr))
    batches = SelfRewardingBatches(sampler, PairLog(run.output_dir, run.is_main), steps_per_iteration)
    run.print(f"self-rewarding: {sr.max_iterations} iterations of {steps_per_iteration} steps ({total} steps), "
              f"{gbs} prompts x {sr.num_responses_to_gen} responses x {sr.num_evals_to_average} judgements per step")

    def round_seed(step: int, validation: bool) -> int:
        return ((cfg.trainer.seed * 1_000_003 + step) * 2 + int(validation)) % (1 << 62)

    def step_fn(indices: list[int], step: int) -> dict[str, float]:
        iteration = (step - 1) // steps_per_iteration
        timers: dict[str, float] = {}
        t0 = time.perf_counter()
        policy.prepare_for_inference()
        result = judge_round(policy, tokenizer, [prompts.records[i]["prompt"] for i in indices],
                             [prompts.token_ids[i] for i in indices], indices, settings,
                             length_control_at(sr.length_control, iteration), round_seed(step, False),
                             policy.dp_rank * len(indices))
        policy.finish_inference()
        timers["time/generation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        batch = pair_batch(result, settings.meta_per_rank, tokenizer.pad_id)
        batch["ref_logps"] = reference.logps(batch, rows_per_example=2).float()
        timers["time/reference"] = time.perf_counter() - t0
        out = round_metrics(policy, round_sums(result, [True] * len(indices)), "train")
        t0 = time.perf_counter()
        if out["train/pairs"] + out["train/meta_judge_pairs"] > 0:
            out.update(dpo_metrics(policy.train_step(batch, loss_fn), "train"))
        else:  # nothing to learn from: an optimizer step on zero gradients would only apply stale momentum
            run.print(f"warning: step {step}: no usable pair in the global batch (every prompt was a bad sample: "
                      f"see pairs/iteration_{iteration}.jsonl); the optimizer step is skipped")
        timers["time/training"] = time.perf_counter() - t0
        records = [jp.record() for jp in result.prompts] + [m.summary for m in result.meta_pairs]
        batches.add(step, [r for share in gather_objects(records, policy.pmesh["dp"]) for r in share])
        if step % steps_per_iteration == 0 and step < total:
            reference.capture()  # the next iteration's reference is this iteration's final policy
            run.print(f"iteration {iteration} done at step {step}: the reference is now the current policy")
        out.update(timers)
        out["train/iteration"] = float(iteration)
        return out

    hooks = Hooks(step=step_fn, total_steps=total, step_tokens=lambda indices: float("nan"),
                  extra_models={"reference": reference})
    if val_prompts is not None:
        share = validation_share(len(val_prompts), policy.dp_rank, policy.dp_size)

        def validate(step: int) -> dict[str, float]:
            idx = [max(i, 0) for i in share]
            keep = [i >= 0 for i in share]
            policy.prepare_for_inference()
            result = judge_round(policy, tokenizer, [val_prompts.records[i]["prompt"] for i in idx],
                                 [val_prompts.token_ids[i] for i in idx], idx,
                                 RoundSettings(**{**settings.__dict__, "meta_template": None}),
                                 length_control_at(sr.length_control, max(step - 1, 0) // steps_per_iteration),
                                 round_seed(step, True), policy.dp_rank * len(idx))
            policy.finish_inference()
            for jp, k in zip(result.prompts, keep):
                if not k:
                    jp.choice.bad = "filler"
            batch = pair_batch(result, 0, tokenizer.pad_id)
            batch["ref_logps"] = reference.logps(batch, rows_per_example=2).float()
            out = round_metrics(policy, round_sums(result, keep), "val")
            if out["val/pairs"] > 0:
                out.update(dpo_metrics(policy.eval_step(batch, loss_fn), "val"))
            rows = [(_prompt_text(jp.prompt), jp.responses[jp.choice.chosen], jp.responses[jp.choice.rejected])
                    for jp in result.prompts if jp.choice.bad is None][:max(cfg.trainer.val_samples, 0)]
            if run.is_main and rows:
                headers = ("prompt", "chosen", "rejected")
                print(f"\nvalidation pairs at step {step}\n" + format_sample_table(rows, headers=headers), flush=True)
                save_samples(run.output_dir, step, rows, headers=headers)
            run.print(f"step {step}: val pairs {out['val/pairs']:.0f}, bad_samples_per_GBS "
                      f"{out['val/bad_samples_per_GBS']:.3f}, chosen/rejected judge score "
                      f"{out['val/chosen_generated_rewards']:.2f}/{out['val/rejected_generated_rewards']:.2f}")
            return out

        hooks.validate = validate
    return run_training(run, policy, batches, loss_fn, hooks, model_dir=model_dir)


class _DPOSection:
    """The ``self_rewarding`` keys in the shape :class:`PairLoss` reads from a ``dpo`` section."""

    def __init__(self, sr: Any):
        self.beta, self.label_smoothing, self.rpo_alpha = sr.beta, sr.label_smoothing, sr.sft_loss_weight
        self.loss_type = "sigmoid" if sr.preference_loss == "dpo" else sr.preference_loss


def _prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``examples/train_self_rewarding.py`` and ``aligner train self_rewarding``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config = "self_rewarding"
    if argv and "=" not in argv[0]:
        config = argv.pop(0)
    train_self_rewarding(load_config(config, argv))
    return 0


if __name__ == "__main__":
    from aligner.parallel.process_exit import exit_after

    exit_after(main)
