"""Supervised fine-tuning: next-token cross-entropy on the assistant tokens of chat data.

    python examples/train_sft.py [overrides]      # same as: aligner train sft [overrides]
"""
from __future__ import annotations

import torch

from aligner.config import load_config
from aligner.data import ResumableDistributedSampler, build_sft_datasets
from aligner.models.fetch import resolve_model_path
from aligner.models.tokenizer import load_tokenizer
from aligner.parallel import cross_entropy
from aligner.parallel.collectives import sum_over
from aligner.trainers.loop import Hooks, Run, SamplerBatches, run_training, start_run
from aligner.trainers.samples import SampleTable, greedy_responses
from aligner.wrappers import PolicyModel


class SFTLoss:
    """Summed token cross-entropy; the wrapper divides by the global number of loss tokens."""

    logits_at_labels = True  # the LM head runs on the assistant tokens' positions only (see LossFn)
    token_level = True  # a sum over tokens: a micro-batch's rows may be laid end to end without padding

    def num_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != -100).sum()

    def __call__(self, logits, batch: dict[str, torch.Tensor]):
        # logits [B, T, V] (vocab-sharded DTensor under TP); labels are already shifted.
        return cross_entropy(logits, batch["labels"], reduction="sum"), {}


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens of the step's examples, padding excluded (packed rows count whole: their padding is a sliver).

    A shared-prompt pair row counts its prompt once per response, as the pair's two rows would: tokens/s
    then measures examples processed, whatever the layout.
    """
    if "attention_mask" not in batch:
        return torch.tensor(batch["tokens"].numel())
    real = batch["attention_mask"].bool()
    if "branch_ids" not in batch:
        return real.sum()
    branches = batch["branch_ids"].amax(-1)  # [N] responses after each row's prompt
    shared = ((batch["branch_ids"] == 0) & real).sum(-1)  # [N]
    return real.sum() + (shared * (branches - 1).clamp(min=0)).sum()


def validation_share(n: int, dp_rank: int, dp_size: int) -> list[int]:
    """This rank's validation indices, strided; every rank gets the same count (-1 = a no-loss filler),
    because ranks must run the same number of forwards (FSDP gathers inside each)."""
    per_rank = -(-n // dp_size)
    share = list(range(dp_rank, n, dp_size))
    return share + [-1] * (per_rank - len(share))


def build_validation(run: Run, policy: PolicyModel, val_data, loss_fn: SFTLoss):
    """``step -> {"val/loss": ...}`` over the whole validation set, averaged per loss token."""
    share = validation_share(len(val_data), policy.dp_rank, policy.dp_size)

    def validate(step: int) -> dict[str, float]:
        batch = val_data.batch([max(i, 0) for i in share])
        filler = torch.tensor([i < 0 for i in share])
        batch["labels"][filler] = -100  # fillers contribute no loss tokens
        metrics = policy.eval_step(batch, loss_fn)
        run.print(f"step {step}: val/loss {metrics['loss']:.4f}")
        return {f"val/{k}": v for k, v in metrics.items()}

    return validate


def train_sft(cfg) -> dict[str, float]:
    """Run SFT as configured; returns the last logged metrics."""
    if not cfg.model.path:
        raise ValueError("model.path is not set: SFT needs a checkpoint directory with a tokenizer "
                         "(e.g. model.path=smollm2-135m-instruct, the embedded model)")
    run = start_run(cfg)
    model_dir = str(resolve_model_path(cfg.model.path))
    cfg.model.path = model_dir
    tokenizer = load_tokenizer(model_dir)
    # Every record is read and validated here, before the model is built or anything is written.
    train_data, val_data = build_sft_datasets(cfg.data, tokenizer, cfg.trainer.max_seq_len, cfg.sft.packing,
                                              cfg.trainer.seed)
    run.print(f"train data: {train_data.describe()}")
    if val_data is not None:
        run.print(f"validation data: {val_data.describe()}")

    policy = PolicyModel(cfg, run.pmesh)
    sampler = ResumableDistributedSampler(len(train_data), policy.dp_rank, policy.dp_size,
                                          cfg.trainer.global_batch_size, seed=cfg.trainer.seed)
    batches = SamplerBatches(sampler, train_data.batch)
    loss_fn = SFTLoss()
    hooks = Hooks(step_tokens=lambda batch: float(sum_over(real_tokens(batch), policy.pmesh["dp"])))
    if val_data is not None:
        hooks.validate = build_validation(run, policy, val_data, loss_fn)
        prompts = val_data.prompts(cfg.trainer.val_samples)
        if prompts:
            table = SampleTable(run.output_dir, enabled=run.is_main)
            hooks.samples = lambda step: table.add(step, prompts, greedy_responses(
                policy, tokenizer, prompts, cfg.trainer.sample_max_new_tokens))
    return run_training(run, policy, batches, loss_fn, hooks, model_dir=model_dir)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``examples/train_sft.py`` and ``aligner train sft``: ``[CONFIG.yaml] [key=value ...]``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config = "sft"
    if argv and "=" not in argv[0]:
        config = argv.pop(0)
    cfg = load_config(config, argv)
    train_sft(cfg)
    return 0


if __name__ == "__main__":
    from aligner.parallel.process_exit import exit_after

    exit_after(main)
