"""One loop for every preference algorithm: reward model, DPO (sigmoid, IPO, hinge, RPO), KTO, CPO, ORPO,
SimPO. They differ only in their loss (:mod:`aligner.trainers.preference_losses`) and in whether a frozen
reference model is needed (DPO, KTO; :mod:`aligner.trainers.reference`).

    python examples/train_dpo.py [overrides]      # same as: aligner train dpo [overrides]
    aligner train rm|kto|cpo|orpo|simpo [overrides]
"""
from __future__ import annotations

from typing import Any

import torch

from aligner.config import load_config
from aligner.data import ResumableDistributedSampler
from aligner.data.preference_dataset import build_kto_datasets, build_preference_datasets
from aligner.models.fetch import resolve_model_path
from aligner.models.tokenizer import load_tokenizer
from aligner.parallel.collectives import sum_over
from aligner.trainers.loop import Hooks, SamplerBatches, run_training, start_run
from aligner.trainers.preference_losses import (
    NEEDS_REFERENCE,
    KTOLoss,
    PairLoss,
    RewardLoss,
    finish_kto_metrics,
)
from aligner.trainers.reference import PrecomputedReference, SwappedReference, dataset_logps, policy_logps
from aligner.trainers.samples import SampleTable, greedy_responses
from aligner.trainers.sft import real_tokens, validation_share
from aligner.wrappers import PolicyModel

ALGORITHMS = ("rm", "dpo", "kto", "cpo", "orpo", "simpo")
# Examples per no-grad forward chunk of the reference pre-pass, in units of trainer.micro_batch_size.
REFERENCE_CHUNK_MICRO_BATCHES = 8


def kto_weight_warning(n_desirable: int, n_undesirable: int, desirable_weight: float,
                       undesirable_weight: float) -> str | None:
    """The KTO paper's advice: ``desirable_weight * n_D / (undesirable_weight * n_U)`` in [1, 4/3]; a message
    naming the numbers when the data and weights fall outside it, else None."""
    if n_undesirable == 0 or n_desirable == 0:
        return (f"KTO data has {n_desirable} desirable and {n_undesirable} undesirable examples; KTO needs both "
                f"kinds to learn what to prefer")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return None
    lo = undesirable_weight * n_undesirable / n_desirable
    return (f"kto.desirable_weight * n_desirable / (kto.undesirable_weight * n_undesirable) = {desirable_weight} * "
            f"{n_desirable} / ({undesirable_weight} * {n_undesirable}) = {ratio:.3f} is outside [1, 4/3], the range "
            f"the KTO paper recommends; set kto.desirable_weight between {lo:.3f} and {lo * 4 / 3:.3f} (or "
            f"rebalance the data)")


class ReferenceSource:
    """Reference log-probs for a split (``train`` / ``val``) of the data, precomputed or swapped in per batch."""

    def __init__(self, policy: PolicyModel, mode: str, splits: dict[str, Any], rows_per_example: int,
                 kto: bool, print_fn=print, shared_prompt: bool = False):
        self.policy, self.mode, self.rows, self.kto = policy, mode, rows_per_example, kto
        self.swapped = SwappedReference(policy) if mode == "on_the_fly" else None
        self.table = None
        if mode == "precompute":
            chunk = policy.micro_batch_size * REFERENCE_CHUNK_MICRO_BATCHES
            tables = {}
            for name, data in splits.items():
                if data is None:
                    continue
                batch_fn = data.shared_prompt_batch if shared_prompt else data.batch
                tables[name] = dataset_logps(policy, len(data), batch_fn, rows_per_example, chunk)
                if kto:
                    tables[f"{name}/kl"] = dataset_logps(policy, len(data), data.kl_batch, 1, chunk)
                print_fn(f"reference log-probs of {len(data)} {name} examples precomputed")
            self.table = PrecomputedReference(tables)
        elif mode != "on_the_fly":
            raise ValueError(f"reference mode '{mode}' is not one of precompute, on_the_fly")

    def logps(self, split: str, indices: list[int], batch: dict[str, torch.Tensor], kl_rows: bool = False):
        """Reference log-probs of ``batch`` (examples ``indices`` of ``split``): ``[rows]``, or ``[pairs, 2]``
        for shared-prompt pair rows."""
        rows = 1 if kl_rows else self.rows
        if self.table is not None:
            table = self.table.lookup(f"{split}/kl" if kl_rows else split, indices)  # [n, k]
            return table.reshape(len(indices) * rows, -1).squeeze(-1)
        return self.swapped.logps(batch, rows).float()


def kto_reference_point(policy: PolicyModel, kl_batch: dict[str, torch.Tensor], ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's ``z_0``: mean over the global batch's mismatched rows of ``log pi - log pi_ref``, clamped at 0
    (detached; a 0-d tensor, the same on every rank)."""
    valid = (kl_batch["labels"] != -100).any(-1)
    diff = (policy_logps(policy, kl_batch).double() - ref_kl.double()) * valid
    totals = sum_over(torch.stack([diff.sum(), valid.sum().double()]), policy.pmesh["dp"])
    return (totals[0] / totals[1].clamp(min=1)).clamp(min=0).float()


def _mask_fillers(batch: dict[str, torch.Tensor], share: list[int], rows: int) -> None:
    filler = torch.tensor([i < 0 for i in share]).repeat_interleave(rows)
    batch["labels"][filler] = -100  # fillers contribute no loss unit


def build_loss(algorithm: str, cfg: Any):
    """The LossFn of ``algorithm`` with its config section."""
    if algorithm == "rm":
        return RewardLoss(cfg.rm.margin)
    if algorithm == "kto":
        return KTOLoss(cfg.kto)
    return PairLoss(algorithm, getattr(cfg, algorithm), shared_prompt=cfg.data.shared_prompt)


def train_preference(algorithm: str, cfg) -> dict[str, float]:
    """Run ``algorithm`` (one of :data:`ALGORITHMS`) as configured; returns the last logged metrics."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown preference algorithm '{algorithm}'; use one of {', '.join(ALGORITHMS)}")
    if not cfg.model.path:
        raise ValueError(f"model.path is not set: {algorithm} needs a checkpoint directory with a tokenizer "
                         f"(e.g. model.path=smollm2-135m-instruct, the embedded model)")
    run = start_run(cfg)
    model_dir = str(resolve_model_path(cfg.model.path))
    cfg.model.path = model_dir
    tokenizer = load_tokenizer(model_dir)
    kto = algorithm == "kto"
    build = build_kto_datasets if kto else build_preference_datasets
    # Every record is read and validated here, before the model is built or anything is written.
    train_data, val_data = build(cfg.data, tokenizer, cfg.trainer.max_seq_len, cfg.trainer.seed)
    run.print(f"train data: {train_data.describe()}")
    if val_data is not None:
        run.print(f"validation data: {val_data.describe()}")
    if kto:
        warning = kto_weight_warning(train_data.n_desirable, train_data.n_undesirable, cfg.kto.desirable_weight,
                                     cfg.kto.undesirable_weight)
        if warning:
            run.print(f"warning: {warning}")

    policy = PolicyModel(cfg, run.pmesh, value_head=algorithm == "rm")
    loss_fn = build_loss(algorithm, cfg)
    rows = loss_fn.rows_per_example
    shared_prompt = getattr(loss_fn, "shared_prompt", False)  # DPO, CPO, ORPO, SimPO with data.shared_prompt

    def batch_of(data, indices: list[int]) -> dict[str, torch.Tensor]:
        return data.shared_prompt_batch(indices) if shared_prompt else data.batch(indices)

    reference = None
    if algorithm in NEEDS_REFERENCE:
        mode = getattr(cfg, algorithm).reference
        reference = ReferenceSource(policy, mode, {"train": train_data, "val": val_data}, rows, kto, run.print,
                                    shared_prompt=shared_prompt)

    def add_extras(split: str, data, indices: list[int], batch: dict[str, torch.Tensor]) -> None:
        if reference is None:
            return
        batch["ref_logps"] = reference.logps(split, indices, batch)
        if kto:
            kl_batch = data.kl_batch(indices)
            ref_kl = reference.logps(split, indices, kl_batch, kl_rows=True)
            batch["kl"] = kto_reference_point(policy, kl_batch, ref_kl)

    sampler = ResumableDistributedSampler(len(train_data), policy.dp_rank, policy.dp_size,
                                          cfg.trainer.global_batch_size, seed=cfg.trainer.seed)
    def train_batch(indices: list[int]) -> dict[str, torch.Tensor]:
        batch = batch_of(train_data, indices)
        add_extras("train", train_data, indices, batch)  # reference log-probs, KTO's KL point
        return batch

    batches = SamplerBatches(sampler, train_batch)
    hooks = Hooks(step_tokens=lambda batch: float(sum_over(real_tokens(batch), policy.pmesh["dp"])))
    if kto:
        hooks.train_metrics = finish_kto_metrics
    if val_data is not None:
        share = validation_share(len(val_data), policy.dp_rank, policy.dp_size)

        def validate(step: int) -> dict[str, float]:
            indices = [max(i, 0) for i in share]
            batch = batch_of(val_data, indices)
            add_extras("val", val_data, indices, batch)
            _mask_fillers(batch, share, rows)
            metrics = policy.eval_step(batch, loss_fn)
            if kto:
                metrics = finish_kto_metrics(metrics)
            shown = {"rm": "accuracy", "kto": "rewards/margins"}.get(algorithm, "rewards/accuracies")
            run.print(f"step {step}: val/loss {metrics['loss']:.4f}, val/{shown} {metrics[shown]:.3f}")
            return {f"val/{k}": v for k, v in metrics.items()}

        hooks.validate = validate
        prompts = val_data.prompts(cfg.trainer.val_samples) if algorithm != "rm" else []
        if prompts:
            table = SampleTable(run.output_dir, enabled=run.is_main)
            hooks.samples = lambda step: table.add(step, prompts, greedy_responses(
                policy, tokenizer, prompts, cfg.trainer.sample_max_new_tokens))
    return run_training(run, policy, batches, loss_fn, hooks, model_dir=model_dir)


def main(argv: list[str] | None = None, algorithm: str = "dpo") -> int:
    """Entry point of ``examples/train_<algorithm>.py`` and ``aligner train <algorithm>``:
    ``[CONFIG.yaml] [key=value ...]``; the config defaults to ``conf/<algorithm>.yaml``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config = algorithm
    if argv and "=" not in argv[0]:
        config = argv.pop(0)
    cfg = load_config(config, argv)
    train_preference(algorithm, cfg)
    return 0


if __name__ == "__main__":
    from aligner.parallel.process_exit import exit_after

    exit_after(main)
