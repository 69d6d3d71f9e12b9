"""SFT tokens/s of aligner's training step against TRL's ``SFTTrainer``, same data and batches, in one run.

    python bench/sft_step.py [--precision float32|bfloat16|both] [--global-batch 8] [--micro-batch 4]
                             [--max-seq-len 512] [--steps 6] [--warmup 1] [--repeats 3] [--threads N]
                             [--data PATH]

Each library runs in its own subprocess, in lockstep with the other (bench/lockstep.py: they take turns
step by step, so step i of both runs under the same machine load); peak memory is per library. The table
gives, per library, the median s/step and tokens/s (real, non-pad tokens) over all timed steps of
``--repeats`` runs, the best step's tokens/s and the peak RSS; the ratio is the median of the per-step
ratios. Only optimizer steps are timed, after ``--warmup`` untimed ones, each from the start of making the
step's batch to the end of the optimizer step (what aligner's training loop times for train/tokens_per_sec):

  aligner  the SFT trainer's own pieces: ``load_config("sft", overrides)``, ``init_distributed`` and
           ``build_mesh`` (a world of one), ``build_sft_datasets``, ``ResumableDistributedSampler``,
           ``PolicyModel`` and ``SFTLoss``; the time of ``train_data.batch(indices)`` and
           ``policy.train_step(batch, loss_fn)``.
  TRL      ``SFTTrainer(model=<path>, args=SFTConfig(...), train_dataset=<the messages>)`` and
           ``trainer.train()``; the time from ``Trainer.get_batch_samples`` (fetching and collating the
           step's micro-batches) to the callback's ``on_step_end``.

Settings, matched to aligner's SFT config (conf/sft.yaml and the schema defaults):
  data       examples/data/sft_train.jsonl: chat ``messages`` and a few prompt/completion records, which
             TRL gets as the user + assistant conversation aligner makes of them, in the order aligner's
             sampler hands them out (``train_sampling_strategy="sequential"``), so both train on the same
             examples at every step (checked: the loss tokens of every step agree).
  loss       assistant tokens only, summed over the global batch and divided by its loss-token count.
             SmolLM2's chat template has no ``{% generation %}`` tags, which ``assistant_only_loss=True``
             needs, so TRL gets, through ``chat_template_path``, the same template with the tags around
             each answer and its ``<|im_end|>`` (checked: it renders every record exactly as the original).
  batch      ``per_device_train_batch_size`` = micro batch, ``gradient_accumulation_steps`` = global /
             micro; ``max_length`` = ``trainer.max_seq_len``; no packing; right padding to the longest row
             (TRL per micro-batch; aligner per step, trimmed per micro-batch to a multiple of 8). TRL's rows
             also keep the newline the template writes after the last ``<|im_end|>`` (one token, no loss),
             which aligner drops; each library's tokens/s counts the real tokens it processed.
  optimizer  AdamW, lr 2e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0, clip at norm 1.0, cosine
             schedule without warmup. TRL keeps its default implementation (``adamw_torch_fused``);
             aligner's is ``torch.optim.AdamW``'s default (foreach).
  precision  float32: float32 weights and compute on both sides (``bf16=False``). bfloat16: float32
             master weights with bf16 compute, aligner through FSDP2's mixed-precision policy
             (``parallel.mixed_precision=bfloat16``), TRL through ``bf16=True`` (autocast).
  other      TRL's defaults otherwise (its fused LM head, its per-step entropy and accuracy metrics),
             except ``gradient_checkpointing=False`` (TRL turns it on by default; aligner's default is
             ``parallel.activation_checkpointing=none``); logging, saving and evaluation off,
             ``report_to="none"``, ``dataloader_num_workers=0``; SDPA attention on both sides; the same
             number of torch threads in both.

Also printed: each run's mean training loss, which agrees closely between the two in float32 (same
weights, same batches, same loss), and each library's optimizer and precision set-up.
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

LEARNING_RATE = 2e-5
SEED = 1234

# SmolLM2-Instruct's ChatML template with {% generation %} around what aligner puts the loss on (the answer
# and its <|im_end|>; the newline after it opens the next turn). The TRL child checks that it renders each
# record exactly as the model's own template.
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON Lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sampler_order(num_records: int, global_batch: int, num_steps: int) -> list[list[int]]:
    """Record indices of each step's global batch, as aligner's sampler hands them out (one rank)."""
    from aligner.data.sampler import ResumableDistributedSampler

    sampler = ResumableDistributedSampler(num_records, 0, 1, global_batch, seed=SEED)
    return [sampler.next_batch() for _ in range(num_steps)]


def timed_batch_fetch(trainer, total_steps: int, seconds: list[float]) -> None:
    """Make ``trainer.get_batch_samples`` (HF Trainer fetches and collates a step's micro-batches with it,
    before ``on_step_begin``) wait for the driver's go and start the step's clock."""
    fetch = trainer.get_batch_samples
    state = {"calls": 0}

    def waiting_fetch(*args, **kwargs):
        if state["calls"] < total_steps:
            Turn.wait()
        state["calls"] += 1
        trainer._bench_step_start = time.perf_counter()
        return fetch(*args, **kwargs)

    trainer.get_batch_samples = waiting_fetch


# ---------------------------------------------------------------------------------------------- aligner
def run_aligner(args, model_dir: str, order: list[list[int]]) -> dict:
    """Time making the batch and ``PolicyModel.train_step`` the way the SFT trainer builds and calls them."""
    import torch

    from aligner.config import load_config
    from aligner.data import ResumableDistributedSampler, build_sft_datasets
    from aligner.models.tokenizer import load_tokenizer
    from aligner.parallel import ParallelDims, build_mesh, init_distributed
    from aligner.trainers.sft import SFTLoss, real_tokens
    from aligner.wrappers import PolicyModel

    total = len(order)
    cfg = load_config("sft", [
        f"model.path={model_dir}", f"data.train={args.data}", "data.validation=null",
        f"trainer.global_batch_size={args.global_batch}", f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.max_seq_len={args.max_seq_len}", f"trainer.max_steps={total}", f"trainer.seed={SEED}",
        f"optim.lr={LEARNING_RATE}", "optim.weight_decay=0.0", "optim.clip_grad=1.0", "optim.sched.name=cosine",
        "optim.sched.warmup_steps=0", f"parallel.mixed_precision={args.precision}",
    ])
    _, world = init_distributed()
    p = cfg.parallel
    pmesh = build_mesh(ParallelDims(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp,
                                    world_size=world))
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(model_dir)
    train_data, _ = build_sft_datasets(cfg.data, tokenizer, cfg.trainer.max_seq_len, cfg.sft.packing, SEED)
    if len(train_data) != len(read_jsonl(args.data)):
        raise RuntimeError(f"aligner kept {len(train_data)} examples of the records of {args.data}; the benchmark "
                           f"needs every record kept so that both libraries see the same batches")
    policy = PolicyModel(cfg, pmesh)
    policy.set_total_steps(total)
    sampler = ResumableDistributedSampler(len(train_data), policy.dp_rank, policy.dp_size,
                                          cfg.trainer.global_batch_size, seed=cfg.trainer.seed)
    loss_fn = SFTLoss()
    out = {"seconds": [], "tokens": [], "loss_tokens": []}
    losses = []
    Turn.send("ready")
    for step in range(total):
        indices = sampler.next_batch()
        assert indices == order[step], "aligner's sampler order differs from the one the driver computed"
        Turn.wait()
        start = time.perf_counter()
        batch = train_data.batch(indices)
        metrics = policy.train_step(batch, loss_fn)
        out["seconds"].append(time.perf_counter() - start)
        Turn.send("step")
        losses.append(metrics["loss"])
        out["tokens"].append(int(real_tokens(batch)))
        out["loss_tokens"].append(int(loss_fn.num_units(batch)))
    Turn.wait()  # wind down only when the other library's last step is over
    opt = policy.optimizer
    out["mean_loss"] = statistics.fmean(losses)
    out["setup"] = (f"torch.optim.AdamW(foreach={opt.defaults.get('foreach')}, fused={opt.defaults.get('fused')}), "
                    f"{next(policy.model.parameters()).dtype} weights, parallel.mixed_precision="
                    f"{cfg.parallel.mixed_precision}, activation_checkpointing={cfg.parallel.activation_checkpointing}")
    return out


# ---------------------------------------------------------------------------------------------- TRL
def run_trl(args, model_dir: str, order: list[list[int]]) -> dict:
    """Time TRL's ``SFTTrainer`` optimizer steps, on the same examples in the same order."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from aligner.data.formats import sft_messages

    # The file mixes chat records and prompt/completion ones; both libraries train on the same conversation
    # (prompt/completion as a user turn and an assistant turn), and a `datasets` table needs one schema.
    records = [sft_messages(r) for r in read_jsonl(args.data)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for messages in records:  # the tagged template must be the model's template plus tags, nothing else
        if (tokenizer.apply_chat_template(messages, chat_template=SMOLLM2_TRAINING_TEMPLATE, tokenize=False)
                != tokenizer.apply_chat_template(messages, tokenize=False)):
            raise RuntimeError(f"the benchmark's tagged chat template renders {messages!r} differently from the "
                               f"model's own template; update SMOLLM2_TRAINING_TEMPLATE")
    ordered = [{"messages": records[i]} for batch in order for i in batch]
    work = Path(tempfile.mkdtemp(prefix="sft_bench_trl_"))
    template = work / "smollm2_training.jinja"
    template.write_text(SMOLLM2_TRAINING_TEMPLATE)
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
    config = SFTConfig(
        output_dir=str(work), seed=SEED, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=micro_steps,
        max_steps=len(order), max_length=args.max_seq_len, packing=False,
        assistant_only_loss=True, chat_template_path=str(template), gradient_checkpointing=False,
        bf16=args.precision == "bfloat16", fp16=False, train_sampling_strategy="sequential",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=model_dir, args=config, train_dataset=Dataset.from_list(ordered),
                         callbacks=[LockstepTimer()])
    timed_batch_fetch(trainer, len(order), seconds)
    # Count each step's real and loss tokens in the batches the trainer collates (a pass-through wrapper).
    seen: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        seen.append((int(batch["attention_mask"].sum()), int((batch["labels"][:, 1:] != -100).sum())))
        return batch

    trainer.data_collator = counting_collator
    result = trainer.train()
    shutil.rmtree(work, ignore_errors=True)
    if len(seen) != micro_steps * len(order):
        raise RuntimeError(f"TRL collated {len(seen)} micro-batches for {len(order)} steps of {micro_steps}")
    steps = [seen[i * micro_steps:(i + 1) * micro_steps] for i in range(len(order))]
    model = trainer.model
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    setup = (f"torch.optim.{type(opt).__name__}(fused={opt.defaults.get('fused')}), {next(model.parameters()).dtype} "
             f"weights, bf16={config.bf16}, gradient_checkpointing={model.is_gradient_checkpointing}, "
             f"attention={model.config._attn_implementation}")
    return {"seconds": seconds, "tokens": [sum(t for t, _ in s) for s in steps],
            "loss_tokens": [sum(n for _, n in s) for s in steps], "mean_loss": result.training_loss, "setup": setup}


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
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--repeats", type=int, default=3, help="paired runs per precision")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in each library's process")
    p.add_argument("--data", default=str(REPO / "examples/data/sft_train.jsonl"))
    p.add_argument("--child", choices=["aligner", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.global_batch % args.micro_batch:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    if len(read_jsonl(args.data)) < args.global_batch:
        raise SystemExit(f"{args.data} has fewer records than --global-batch {args.global_batch}")
    print(environment(args.threads), flush=True)
    precisions = ["float32", "bfloat16"] if args.precision == "both" else [args.precision]
    ratios = {}
    for precision in precisions:
        child_args = ["--precision", precision]
        for name in ("global_batch", "micro_batch", "max_seq_len", "steps", "warmup", "threads", "data"):
            child_args += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        runs = run_benchmark(__file__, child_args, args.warmup, args.steps, args.repeats, precision)
        ratios[precision] = compare(runs, (
            f"SFT step, SmolLM2-135M-Instruct, {precision}, global batch {args.global_batch} (micro "
            f"{args.micro_batch}), max_seq_len {args.max_seq_len}, {args.threads} threads, {args.repeats} runs x "
            f"{args.steps} timed steps"))
    print("summary, tokens/s aligner / TRL (median of paired steps; best against best): "
          + ", ".join(f"{k} {v['median']:.2f}x; {v['best']:.2f}x" for k, v in ratios.items()))
    print(f"finished {time.strftime('%H:%M')}, load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
