"""DPO tokens/s of ``aligner train dpo`` against TRL's ``DPOTrainer``, same data and batches, in one run.

    python bench/dpo_step.py [--precision float32|bfloat16|both] [--global-batch 8] [--micro-batch 4]
                             [--max-seq-len 512] [--steps 4] [--warmup 1] [--repeats 2] [--threads N]
                             [--data examples/data/preference_train.jsonl]

Each library runs in its own subprocess, in lockstep with the other (bench/lockstep.py: they take turns
step by step, so step i of both runs under the same machine load); peak memory is per library. Tokens/s
counts the real (non-pad) tokens of the chosen and rejected rows of a step's pairs over the step's wall
time; the table gives medians over all timed steps of ``--repeats`` runs and the median of the per-step
ratios. Both libraries precompute the reference log-probs in one pass before training, outside the clock.

  aligner  the real entry point, ``aligner.trainers.preference.main(["dpo", overrides...])``; a step's time
           is ``train/tokens_per_sec`` of ``metrics.jsonl`` (the loop's clock: making the batch, with its
           reference log-prob lookup, and ``PolicyModel.train_step``). The child only blocks between steps
           (before the loop's first step, and in the preemption check that ends each step).
  TRL      ``DPOTrainer(model=<path>, args=DPOConfig(...), train_dataset=<the pairs>)`` and ``train()``; a
           step's time runs from ``Trainer.get_batch_samples`` (fetching and collating the step's
           micro-batches) to the callback's ``on_step_end``.

Settings, matched between the two:
  data       the first ``global_batch * (warmup + steps)`` records of ``--data`` (one epoch of the run; so the
             reference pass stays short), in the order aligner's sampler hands them out; TRL gets them in that
             order as conversations (the prompt a user turn, each response an assistant turn) with
             ``train_sampling_strategy="sequential"``.
  tokens     SmolLM2's chat template; TRL's copy leaves out the newline the template writes after the final
             assistant turn (aligner puts no loss on it and drops it), so both train on the same token ids
             with the loss on the same tokens (checked, row by row, before training).
  loss       sigmoid DPO, beta 0.1, no label smoothing, summed response log-probs; aligner's
             ``dpo.rpo_alpha=0`` (its default 1.0 mixes in RPO's NLL, which TRL's plain sigmoid lacks).
  batch      ``per_device_train_batch_size`` = micro batch (pairs), ``gradient_accumulation_steps`` = global /
             micro; TRL forwards the chosen and rejected rows of a micro-batch together, aligner one
             ``[prompt | chosen | rejected]`` row per pair (its default ``data.shared_prompt``; the prompt runs
             once; ``--no-shared-prompt``: two rows as TRL); ``max_length`` = ``trainer.max_seq_len``; right
             padding (aligner to a multiple of 8, TRL to the longest row).
  optimizer  AdamW, lr 5e-6 (conf/dpo.yaml), betas (0.9, 0.999), eps 1e-8, weight decay 0, clip 1.0, cosine,
             no warmup. Each library keeps its own AdamW implementation (both fused).
  precision  float32, or bfloat16 compute over float32 master weights (aligner: parallel.mixed_precision,
             TRL: ``bf16=True``, autocast).
  other      TRL's defaults otherwise (its fused LM head and per-step entropy, logit and accuracy metrics),
             except ``gradient_checkpointing=False`` (as aligner's default); no validation, logging, saving
             (aligner saves a checkpoint after its last step, outside the clock); SDPA attention on both.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockstep import REPO, Turn, compare, environment, peak_rss_gib, run_benchmark  # noqa: E402
from sft_step import read_jsonl, sampler_order, timed_batch_fetch  # noqa: E402

LEARNING_RATE = 5e-6
BETA = 0.1
SEED = 1234
REFERENCE_CHUNK = 8  # micro-batches per no-grad forward of TRL's reference pass (aligner's default chunk)

# SmolLM2-Instruct's ChatML template, without the newline after a final assistant turn: aligner's rows end at
# the response's <|im_end|>. The TRL child checks it against the model's own template.
SMOLLM2_DPO_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if not (loop.last and message['role'] == 'assistant') %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def aligner_overrides(args, model_dir: str, output_dir: str, total: int) -> list[str]:
    """The ``aligner train dpo`` overrides of the benchmark's settings."""
    return [
        f"model.path={model_dir}", f"data.train={args.data}", "data.validation=null",
        f"trainer.global_batch_size={args.global_batch}", f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.max_seq_len={args.max_seq_len}", f"trainer.max_steps={total}", f"trainer.seed={SEED}",
        "trainer.val_check_interval=0", "trainer.save_interval=0", "trainer.save_top_k=1", "trainer.resume=never",
        "trainer.val_samples=0", f"trainer.output_dir={output_dir}", "logger.progress_bar=false",
        f"optim.lr={LEARNING_RATE}", "optim.weight_decay=0.0", "optim.clip_grad=1.0", "optim.sched.name=cosine",
        "optim.sched.warmup_steps=0", f"parallel.mixed_precision={args.precision}",
        f"dpo.beta={BETA}", "dpo.loss_type=sigmoid", "dpo.label_smoothing=0.0", "dpo.rpo_alpha=0.0",
        "dpo.reference=precompute", f"data.shared_prompt={str(args.shared_prompt).lower()}",
    ]


# ---------------------------------------------------------------------------------------------- aligner
def run_aligner(args, model_dir: str, order: list[list[int]]) -> dict:
    """Run ``aligner train dpo``, blocking between its steps; step times from its metrics.jsonl."""
    from aligner.trainers import loop, preference
    from aligner.trainers.sft import real_tokens
    from aligner.wrappers import PolicyModel

    total = len(order)
    batches: list[dict] = []
    state = {"started": False}
    next_batch, prepare, agreed = (loop.SamplerBatches.next_batch, PolicyModel.prepare_for_training,
                                   loop.Preemption.agreed)

    def kept_batch(self):  # inside the loop's clock: only keeps a reference
        batch = next_batch(self)
        batches.append(batch)
        return batch

    def prepare_then_wait(self):  # the loop calls it right before its first step
        prepare(self)
        if not state["started"]:
            state["started"], state["optimizer"] = True, self.optimizer
            Turn.send("ready")
            Turn.wait()

    def report_then_wait(self):  # the loop asks at the end of every step, after it logged the step
        Turn.send("step")
        Turn.wait()  # the next step's go; after the last step, the go to wind down
        return agreed(self)

    loop.SamplerBatches.next_batch = kept_batch
    PolicyModel.prepare_for_training = prepare_then_wait
    loop.Preemption.agreed = report_then_wait
    output_dir = tempfile.mkdtemp(prefix="dpo_bench_aligner_")
    try:
        preference.main(["dpo", *aligner_overrides(args, model_dir, output_dir, total)])
        metrics = read_jsonl(os.path.join(output_dir, "metrics.jsonl"))
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)  # the final checkpoint is ~1.7 GB
    if len(batches) != total or len(metrics) != total:
        raise RuntimeError(f"aligner ran {len(batches)} batches and logged {len(metrics)} steps; expected {total}")
    for step, batch in enumerate(batches):
        pairs = batch["pair_index"].tolist() if args.shared_prompt else batch["pair_index"][0::2].tolist()
        if pairs != order[step]:
            raise RuntimeError(f"aligner's step {step + 1} trained on pairs {pairs}, the driver expected {order[step]}")
    # The tokens of the pairs' chosen and rejected rows, as TRL processes them, whatever aligner's layout (a
    # shared-prompt row holds its prompt once); train/tokens_per_sec counts the same tokens.
    tokens = [int(real_tokens(b)) for b in batches]
    opt = state["optimizer"]
    return {
        "seconds": [n / m["train/tokens_per_sec"] for n, m in zip(tokens, metrics)],
        "tokens": tokens,
        "loss_tokens": [int((b["labels"] != -100).sum()) for b in batches],
        "mean_loss": statistics.fmean(m["train/loss"] for m in metrics),
        "first_loss": metrics[0]["train/loss"],
        "setup": f"aligner train dpo, parallel.mixed_precision={args.precision}, dpo.rpo_alpha=0, "
                 f"data.shared_prompt={str(args.shared_prompt).lower()}, "
                 f"dpo.reference=precompute, optimizer torch.optim.{type(opt).__name__}"
                 f"(foreach={opt.defaults.get('foreach')}, fused={opt.defaults.get('fused')})",
    }


# ---------------------------------------------------------------------------------------------- TRL
def check_same_tokens(trainer, args, model_dir: str, ordered: list[int]) -> None:
    """TRL's tokenized pairs must be aligner's rows, token for token, with the loss on the same tokens."""
    from aligner.config import load_config
    from aligner.data.preference_dataset import build_preference_datasets
    from aligner.models.tokenizer import load_tokenizer

    cfg = load_config("dpo", [f"data.train={args.data}", "data.validation=null"])
    ours, _ = build_preference_datasets(cfg.data, load_tokenizer(model_dir), args.max_seq_len, SEED)
    if len(ours) != len(trainer.train_dataset):
        raise RuntimeError(f"aligner kept {len(ours)} pairs and TRL {len(trainer.train_dataset)} of {args.data}")
    for row, i in zip(trainer.train_dataset, ordered):
        for k, name in ((0, "chosen"), (1, "rejected")):
            mine = ours.rows[2 * i + k]
            theirs = row["prompt_ids"] + row[f"{name}_ids"]
            their_mask = [False] * len(row["prompt_ids"]) + [True] * len(row[f"{name}_ids"])
            if mine.input_ids.tolist() != theirs or mine.loss_mask.tolist() != their_mask:
                raise RuntimeError(f"pair {i} ({name}): TRL's tokens or loss mask differ from aligner's row; "
                                   f"update SMOLLM2_DPO_TEMPLATE")


def run_trl(args, model_dir: str, order: list[list[int]]) -> dict:
    """Time TRL's ``DPOTrainer`` optimizer steps, on the same pairs in the same order."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from aligner.data.formats import prompt_messages
    from aligner.data.preference import response_messages

    records = read_jsonl(args.data)
    ordered = [i for batch in order for i in batch]
    pairs = [{"prompt": prompt_messages(records[i]["prompt"]), "chosen": response_messages(records[i]["chosen"]),
              "rejected": response_messages(records[i]["rejected"])} for i in ordered]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for pair in pairs:  # the template must render the prompt as the model's does, and responses minus one "\n"
        for name in ("chosen", "rejected"):
            own = tokenizer.apply_chat_template(pair["prompt"] + pair[name], tokenize=False)
            new = tokenizer.apply_chat_template(pair["prompt"] + pair[name], tokenize=False,
                                                chat_template=SMOLLM2_DPO_TEMPLATE)
            if own != new + "\n":
                raise RuntimeError(f"SMOLLM2_DPO_TEMPLATE renders {pair['prompt'] + pair[name]!r} otherwise than "
                                   f"the model's template less the final newline; update it")
    tokenizer.chat_template = SMOLLM2_DPO_TEMPLATE
    work = Path(tempfile.mkdtemp(prefix="dpo_bench_trl_"))
    seconds: list[float] = []
    trainer = None

    class LockstepTimer(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            Turn.send("ready")

        def on_step_end(self, targs, state, control, **kwargs):
            seconds.append(time.perf_counter() - trainer._bench_step_start)
            Turn.send("step")

        def on_train_end(self, targs, state, control, **kwargs):
            Turn.wait()  # the end of training runs only when the other library's last step is over

    micro_steps = args.global_batch // args.micro_batch
    config = DPOConfig(
        output_dir=str(work), seed=SEED, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=micro_steps,
        max_steps=len(order), max_length=args.max_seq_len, beta=BETA, loss_type=["sigmoid"], label_smoothing=0.0,
        precompute_ref_log_probs=True, precompute_ref_batch_size=args.micro_batch * REFERENCE_CHUNK,
        gradient_checkpointing=False, bf16=args.precision == "bfloat16", fp16=False,
        train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    # The reference pass runs inside the constructor, before the clock.
    trainer = DPOTrainer(model=model_dir, args=config, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, callbacks=[LockstepTimer()])
    check_same_tokens(trainer, args, model_dir, ordered)
    timed_batch_fetch(trainer, len(order), seconds)
    seen: list[tuple[int, int]] = []  # real and loss tokens of each micro-batch the trainer collates
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        seen.append((int(batch["attention_mask"].sum()), int(batch["completion_mask"].sum())))
        return batch

    trainer.data_collator = counting_collator
    result = trainer.train()
    shutil.rmtree(work, ignore_errors=True)
    if len(seen) != micro_steps * len(order):
        raise RuntimeError(f"TRL collated {len(seen)} micro-batches for {len(order)} steps of {micro_steps}")
    steps = [seen[i * micro_steps:(i + 1) * micro_steps] for i in range(len(order))]
    model = trainer.model
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    setup = (f"DPOTrainer, bf16={config.bf16}, precompute_ref_log_probs=True, loss_type=sigmoid, "
             f"gradient_checkpointing={model.is_gradient_checkpointing}, "
             f"attention={model.config._attn_implementation}, optimizer torch.optim.{type(opt).__name__}"
             f"(fused={opt.defaults.get('fused')}), {next(model.parameters()).dtype} weights")
    return {"seconds": seconds, "tokens": [sum(t for t, _ in s) for s in steps],
            "loss_tokens": [sum(n for _, n in s) for s in steps], "mean_loss": result.training_loss,
            "setup": setup}


# ---------------------------------------------------------------------------------------------- driver
def child(args) -> None:
    """Run one library in this process, in lockstep with the driver; the last line is the result."""
    import torch

    torch.set_num_threads(args.threads)
    from aligner.models.fetch import fetch_model

    model_dir = str(fetch_model("smollm2-135m-instruct"))
    order = sampler_order(len(read_jsonl(args.data)), args.global_batch, args.warmup + args.steps)
    out = (run_aligner if args.child == "aligner" else run_trl)(args, model_dir, order)
    out["peak_rss_gib"] = peak_rss_gib()
    Turn.send("result", out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="both", choices=["both", "float32", "bfloat16"])
    p.add_argument("--global-batch", type=int, default=8, help="preference pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward/backward")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--repeats", type=int, default=2, help="paired runs per precision")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in each library's process")
    p.add_argument("--data", default=str(REPO / "examples/data/preference_train.jsonl"))
    p.add_argument("--no-shared-prompt", dest="shared_prompt", action="store_false",
                   help="aligner with data.shared_prompt=false: two rows per pair, as TRL lays them out")
    p.add_argument("--child", choices=["aligner", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.global_batch % args.micro_batch:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    # One epoch of exactly the run's pairs: both reference passes cover only what is trained on.
    needed = args.global_batch * (args.warmup + args.steps)
    records = read_jsonl(args.data)
    if len(records) < needed:
        raise SystemExit(f"{args.data} has {len(records)} records; --global-batch {args.global_batch} x "
                         f"(--warmup {args.warmup} + --steps {args.steps}) needs {needed}")
    work = Path(tempfile.mkdtemp(prefix="dpo_bench_"))
    subset = work / f"first_{needed}_pairs.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in records[:needed]), encoding="utf-8")
    print(environment(args.threads), flush=True)
    print(f"data: the first {needed} records of {args.data}", flush=True)
    precisions = ["float32", "bfloat16"] if args.precision == "both" else [args.precision]
    ratios = {}
    try:
        for precision in precisions:
            child_args = ["--precision", precision, "--data", str(subset)]
            for name in ("global_batch", "micro_batch", "max_seq_len", "steps", "warmup", "threads"):
                child_args += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            if not args.shared_prompt:
                child_args.append("--no-shared-prompt")
            runs = run_benchmark(__file__, child_args, args.warmup, args.steps, args.repeats, precision)
            ratios[precision] = compare(runs, (
                f"DPO step, SmolLM2-135M-Instruct, {precision}, {args.global_batch} pairs per step (micro "
                f"{args.micro_batch}), max_seq_len {args.max_seq_len}, {args.threads} threads, {args.repeats} runs "
                f"x {args.steps} timed steps"))
            first = [run["aligner"]["first_loss"] for run in runs]
            print(f"aligner's step-1 loss (policy = reference, so log 2 = 0.693147): "
                  + ", ".join(f"{x:.6f}" for x in first), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("summary, tokens/s aligner / TRL (median of paired steps; best against best): "
          + ", ".join(f"{k} {v['median']:.2f}x; {v['best']:.2f}x" for k, v in ratios.items()))
    print(f"finished {time.strftime('%H:%M')}, load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
