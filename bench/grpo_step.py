"""One GRPO step (generation + scoring + update) of ``train_online("grpo")`` against TRL's ``GRPOTrainer``, in one run.

    python bench/grpo_step.py [--precision float32|bfloat16] [--prompts 4] [--num-generations 4]
                              [--max-completion-length 32] [--micro-batch 4] [--steps 3] [--warmup 1]
                              [--threads 1] [--engine-slots N] [--sample-eos]
                              [--data examples/data/arithmetic_train.jsonl]

Each library runs in its own subprocess, in lockstep with the other (bench/lockstep.py: they take turns step by
step, so step i of both runs under the same machine load). A step is one generation round (``--prompts`` prompts x
``--num-generations`` samples), the rewards, and one optimizer step on those completions. After ``--warmup`` untimed
steps (ours compiles its decode step in the first), the table gives per library the median over ``--steps`` timed
steps of the step time, the generation time and its share of the step, the completion tokens generated per step and
generated tokens/s; the ratio is the median of the per-step ratios TRL time / our time (above 1: ours is faster).

  aligner  the real entry point, ``train_online("grpo", load_config("grpo", overrides))`` on conf/grpo.yaml; a step
           is timed from the loop's start of the step (after the driver's go) to the preemption check that ends it
           (rollout, rewards, old log-probs, optimizer step, logging); generation is the trainer's own
           ``time/generation`` of metrics.jsonl (``PolicyModel.generate``: the engine's prefill, decode and sampling);
           ``time/refit`` (copying the updated weights into the engine) is shown apart in the breakdown line.
  TRL      ``GRPOTrainer(model=<path>, reward_funcs=[accuracy], args=GRPOConfig(...))`` and ``train()``; a step is
           timed from ``Trainer.get_batch_samples`` to the callback's ``on_step_end``; generation is the time of
           ``GRPOTrainer._generate_single_turn`` (left-padding the prompts, ``unwrapped_model.generate`` and the
           EOS masking of its output; ``use_vllm=False``, transformers' own generation).

Settings, matched between the two:
  prompts    the shipped ``examples/data/arithmetic_train.jsonl`` records (``prompt`` + ``solution``) in the order
             aligner's sampler hands them out; TRL gets them in that order as one-user-turn conversations with
             ``shuffle_dataset=False``, so both render the same chat-template prompt token ids (checked at every
             step against aligner's ``build_prompt_data``).
  reward     ``aligner.algorithms.rewards:accuracy`` on both sides (it keeps TRL's reward-function contract).
  sampling   temperature 1.0, top-k off, top-p 1.0, ``--max-completion-length`` tokens at most. By default every
             completion is exactly that long on both sides: EOS is suppressed until then (aligner:
             ``generation.min_new_tokens``, TRL: ``generation_kwargs={"min_new_tokens": ...}``), the same mechanism on
             both sides; ``--sample-eos`` lets both stop at
             EOS (the lengths then differ, so compare generated tokens/s).
  algorithm  ``num_generations`` samples per prompt, group-normalised advantages, clip 0.2, beta 0 (no reference
             model), one pass (``num_iterations=1``), token-mean loss over the step's completion tokens
             (aligner's ``token_mean`` = TRL's ``dapo``); one optimizer step per generation round (aligner: one
             mini-batch; TRL: ``gradient_accumulation_steps`` = ``steps_per_generation`` = prompts x generations /
             micro-batch). With one optimizer step per generation round neither side runs a no-grad forward for
             the old log-probs: the training forward's own, detached, are the old ones (ratio exactly 1).
  batch      ``--micro-batch`` completions per forward/backward (aligner ``trainer.micro_batch_size``, TRL
             ``per_device_train_batch_size``). aligner's engine as configured by default
             (``generation.max_batch_size`` 64, the most KV-cache slots): each call allocates and decodes one slot
             per completion, rounded up to a power of two (16 here; TRL's ``generate`` runs exactly those rows).
             ``--engine-slots N`` sets ``generation.max_batch_size`` instead.
  optimizer  AdamW, lr 1e-6 (conf/grpo.yaml), betas (0.9, 0.999), eps 1e-8, weight decay 0, clip 1.0, cosine, no
             warmup; each library its own AdamW (both fused on CPU).
  precision  float32: float32 weights, training and generation (aligner ``generation.dtype=float32``). bfloat16:
             float32 master weights with bf16 compute (aligner ``parallel.mixed_precision=bfloat16`` and a bf16
             engine, TRL ``bf16=True``: autocast).
  other      no gradient checkpointing, no validation, logging or saving (aligner saves a checkpoint after its last
             step, outside the clock); SDPA attention; the same number of torch threads on both sides.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockstep import REPO, Turn, environment, peak_rss_gib, run_benchmark  # noqa: E402
from sft_step import read_jsonl, sampler_order, timed_batch_fetch  # noqa: E402

LEARNING_RATE = 1e-6  # conf/grpo.yaml
EPSILON = 0.2
SEED = 1234


def min_new_tokens(args) -> int:
    """The EOS-suppressing minimum length both libraries get: the full length, or 0 with ``--sample-eos``."""
    return 0 if args.sample_eos else args.max_completion_length


def engine_slots(args) -> int | None:
    """aligner's ``generation.max_batch_size`` when ``--engine-slots`` sets it; None: the config's."""
    return args.engine_slots or None


def aligner_overrides(args, model_dir: str, output_dir: str, total: int) -> list[str]:
    """The ``aligner train grpo`` overrides of the benchmark's settings."""
    return [
        f"model.path={model_dir}", f"data.train={args.data}", "data.validation=null",
        f"trainer.global_batch_size={args.prompts}", f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.max_steps={total}", f"trainer.seed={SEED}", "trainer.val_check_interval=0",
        "trainer.save_interval=0", "trainer.save_top_k=1", "trainer.resume=never", "trainer.val_samples=0",
        f"trainer.output_dir={output_dir}", "logger.progress_bar=false",
        f"optim.lr={LEARNING_RATE}", "optim.weight_decay=0.0", "optim.clip_grad=1.0", "optim.sched.name=cosine",
        "optim.sched.warmup_steps=0", f"parallel.mixed_precision={args.precision}",
        f"grpo.num_generations={args.num_generations}", f"grpo.max_completion_length={args.max_completion_length}",
        "grpo.temperature=1.0", "grpo.beta=0.0", "grpo.num_iterations=1", "grpo.num_mini_batches=1",
        f"grpo.epsilon={EPSILON}", "grpo.loss_type=token_mean", "grpo.scale_rewards=group",
        "generation.top_k=0", "generation.top_p=1.0",
        f"generation.min_new_tokens={min_new_tokens(args)}", f"generation.dtype={args.precision}",
    ] + ([f"generation.max_batch_size={engine_slots(args)}"] if engine_slots(args) else [])


# ---------------------------------------------------------------------------------------------- aligner
def run_aligner(args, model_dir: str, order: list[list[int]]) -> dict:
    """Run ``train_online("grpo")``, blocking between its steps; the generation time from its metrics.jsonl."""
    from aligner.config import load_config
    from aligner.generation.torch_engine import slot_count
    from aligner.trainers import loop, online
    from aligner.wrappers import PolicyModel

    total = len(order)
    seen: list[list[int]] = []
    seconds: list[float] = []
    state = {"started": False, "start": 0.0}
    next_batch, prepare, agreed = (loop.SamplerBatches.next_batch, PolicyModel.prepare_for_training,
                                   loop.Preemption.agreed)

    def kept_batch(self):  # inside the loop's clock: only keeps a reference
        indices = next_batch(self)
        seen.append(list(indices))
        return indices

    def prepare_then_wait(self):  # the loop calls it right before its first step
        prepare(self)
        if not state["started"]:
            state["started"], state["optimizer"] = True, self.optimizer
            Turn.send("ready")
            Turn.wait()
            state["start"] = time.perf_counter()

    def report_then_wait(self):  # the loop asks at the end of every step, after it logged the step
        seconds.append(time.perf_counter() - state["start"])
        Turn.send("step")
        Turn.wait()  # the next step's go; after the last step, the go to wind down
        state["start"] = time.perf_counter()
        return agreed(self)

    loop.SamplerBatches.next_batch = kept_batch
    PolicyModel.prepare_for_training = prepare_then_wait
    loop.Preemption.agreed = report_then_wait
    output_dir = tempfile.mkdtemp(prefix="grpo_bench_aligner_")
    cfg = load_config("grpo", aligner_overrides(args, model_dir, output_dir, total))
    max_slots = cfg.generation.max_batch_size
    try:
        online.train_online("grpo", cfg)
        metrics = read_jsonl(os.path.join(output_dir, "metrics.jsonl"))
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)  # the final checkpoint
    if seen != order or len(metrics) != total:
        raise RuntimeError(f"aligner ran prompts {seen} and logged {len(metrics)} steps; the driver expected {order}")
    n = args.prompts * args.num_generations
    tokens = [round(m["rollout/response_length"] * n) for m in metrics]
    opt = state["optimizer"]
    return {
        "seconds": seconds, "tokens": tokens, "loss_tokens": tokens,
        "generation_seconds": [m["time/generation"] for m in metrics],
        "breakdown": {k: [m[f"time/{k}"] for m in metrics] for k in ("refit", "generation", "scoring", "reference",
                                                                     "training")},
        "mean_loss": statistics.fmean(m["loss/policy_avg"] for m in metrics),
        "mean_reward": statistics.fmean(m["objective/scores"] for m in metrics),
        "setup": f"train_online('grpo'), parallel.mixed_precision={args.precision}, generation.dtype={args.precision}"
                 f", generation.max_batch_size={max_slots} ({slot_count(n, max_slots)} KV-cache slots per call), "
                 f"generation.compile=True, optimizer "
                 f"torch.optim.{type(opt).__name__}(fused={opt.defaults.get('fused')})",
    }


# ---------------------------------------------------------------------------------------------- TRL
def run_trl(args, model_dir: str, order: list[list[int]]) -> dict:
    """Time TRL's ``GRPOTrainer`` steps on the same prompts in the same order; generation timed apart."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from aligner.algorithms.rewards import accuracy
    from aligner.config import load_config
    from aligner.data.formats import prompt_messages
    from aligner.models.tokenizer import load_tokenizer
    from aligner.trainers.online_batch import build_prompt_data

    records = read_jsonl(args.data)
    ordered = [i for batch in order for i in batch]
    rows = [{"prompt": prompt_messages(records[i]["prompt"]), "solution": records[i]["solution"]} for i in ordered]
    # What aligner's loop generates from: its prompt token ids, with the same truncation.
    cfg = load_config("grpo", [f"data.train={args.data}"])
    ours = build_prompt_data(args.data, load_tokenizer(model_dir),
                             cfg.trainer.max_seq_len - args.max_completion_length, cfg.data.overlong)
    if len(ours) != len(records):
        raise RuntimeError(f"aligner kept {len(ours)} of the {len(records)} prompts of {args.data}; the driver's "
                           f"sampler order assumes all")
    work = Path(tempfile.mkdtemp(prefix="grpo_bench_trl_"))
    seconds: list[float] = []
    generation_seconds: list[float] = []
    tokens: list[int] = []
    rewards: list[float] = []
    trainer = None

    class LockstepTimer(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            Turn.send("ready")

        def on_step_end(self, targs, state, control, **kwargs):
            seconds.append(time.perf_counter() - trainer._bench_step_start)
            Turn.send("step")
            rewards.append(trainer._metrics["train"]["reward"][-1])  # the metrics are cleared at the final log

        def on_train_end(self, targs, state, control, **kwargs):
            Turn.wait()  # the end of training runs only when the other library's last step is over

    n = args.prompts * args.num_generations
    config = GRPOConfig(
        output_dir=str(work), seed=SEED, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=n // args.micro_batch,
        max_steps=len(order), num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": min_new_tokens(args)}, use_vllm=False, beta=0.0, num_iterations=1,
        epsilon=EPSILON, loss_type="dapo", scale_rewards="group", shuffle_dataset=False,
        gradient_checkpointing=False, bf16=args.precision == "bfloat16", fp16=False, logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", log_completions=False, dataloader_num_workers=0,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[accuracy], args=config,
                          train_dataset=Dataset.from_list(rows), callbacks=[LockstepTimer()])
    if config.steps_per_generation * config.per_device_train_batch_size != n:
        raise RuntimeError(f"TRL generates {config.generation_batch_size} completions per round, not {n}")
    timed_batch_fetch(trainer, len(order), seconds)
    generate = trainer._generate_single_turn

    def timed_generate(prompt_ids, *rest, **kwargs):
        step = len(generation_seconds)
        expected = [ours.token_ids[i] for i in order[step] for _ in range(args.num_generations)]
        if [list(p) for p in prompt_ids] != expected:
            raise RuntimeError(f"step {step + 1}: TRL's prompt token ids differ from aligner's for prompts "
                               f"{order[step]}")
        start = time.perf_counter()
        completion_ids, logprobs = generate(prompt_ids, *rest, **kwargs)
        generation_seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(c) for c in completion_ids))
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate
    result = trainer.train()
    shutil.rmtree(work, ignore_errors=True)
    if len(generation_seconds) != len(order):
        raise RuntimeError(f"TRL generated {len(generation_seconds)} times in {len(order)} steps; one round per "
                           f"optimizer step was expected")
    model = trainer.model
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return {
        "seconds": seconds, "tokens": tokens, "loss_tokens": tokens, "generation_seconds": generation_seconds,
        "mean_loss": result.training_loss, "mean_reward": statistics.fmean(rewards),
        "setup": f"GRPOTrainer, use_vllm=False, bf16={config.bf16}, loss_type=dapo, steps_per_generation="
                 f"{config.steps_per_generation}, gradient_checkpointing={model.is_gradient_checkpointing}, "
                 f"attention={model.config._attn_implementation}, optimizer torch.optim.{type(opt).__name__}"
                 f"(fused={opt.defaults.get('fused')}), {next(model.parameters()).dtype} weights",
    }


# ---------------------------------------------------------------------------------------------- driver
def child(args) -> None:
    """Run one library in this process, in lockstep with the driver; the last line is the result."""
    import torch

    torch.set_num_threads(args.threads)
    from aligner.models.fetch import fetch_model

    model_dir = str(fetch_model("smollm2-135m-instruct"))
    order = sampler_order(len(read_jsonl(args.data)), args.prompts, args.warmup + args.steps)
    out = (run_aligner if args.child == "aligner" else run_trl)(args, model_dir, order)
    out["peak_rss_gib"] = peak_rss_gib()
    Turn.send("result", out)


def print_table(run: dict[str, dict], args) -> None:
    """The step and generation times of both libraries (timed steps only) and their ratios."""
    med = statistics.median
    print(f"\nGRPO step, SmolLM2-135M-Instruct, {args.precision}, {args.prompts} prompts x {args.num_generations} "
          f"generations, max_completion_length {args.max_completion_length} "
          f"({'EOS sampled' if args.sample_eos else 'EOS suppressed: every completion full length'}), micro-batch "
          f"{args.micro_batch}, aligner generation.max_batch_size {engine_slots(args) or 'default'}, temperature "
          f"1.0, beta 0, "
          f"lr {LEARNING_RATE:g}, {args.threads} threads, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'side':<9}{'s/step':>9}{'gen s':>8}{'gen share':>11}{'other s':>9}{'tok/step':>10}{'gen tok/s':>11}"
          f"{'peak GiB':>10}{'reward':>8}")
    for lib in ("aligner", "trl"):
        r = run[lib]
        gen = r["generation_seconds"]
        print(f"{lib:<9}{med(r['seconds']):>9.2f}{med(gen):>8.2f}"
              f"{med(g / s for g, s in zip(gen, r['seconds'])):>10.0%} "
              f"{med(s - g for g, s in zip(gen, r['seconds'])):>9.2f}{statistics.fmean(r['tokens']):>10.1f}"
              f"{med(t / g for t, g in zip(r['tokens'], gen)):>11.1f}{r['peak_rss_gib']:>10.2f}"
              f"{r['mean_reward']:>8.3f}")
    print("(medians over the timed steps; tok/step: completion tokens generated per step, EOS included; "
          "reward: mean accuracy over all steps)")
    b = run["aligner"]["breakdown"]
    print("  aligner step breakdown (median s): " + ", ".join(f"{k} {med(v):.2f}" for k, v in b.items()))
    for lib in ("aligner", "trl"):
        print(f"  {lib}: {run[lib]['setup']}")
    a, t = run["aligner"], run["trl"]
    ratios = {
        "step": [y / x for x, y in zip(a["seconds"], t["seconds"])],
        "generation": [y / x for x, y in zip(a["generation_seconds"], t["generation_seconds"])],
        "other": [(ty - gy) / (ax - gx) for ax, gx, ty, gy in zip(a["seconds"], a["generation_seconds"],
                                                                   t["seconds"], t["generation_seconds"])],
        "gen tok/s": [(ta / ga) / (tt / gt) for ta, ga, tt, gt in zip(a["tokens"], a["generation_seconds"],
                                                                      t["tokens"], t["generation_seconds"])],
    }
    print("speed ratio TRL / aligner (time; above 1: aligner faster; median of paired steps, range): " + "; ".join(
        f"{k} {med(v):.2f}x ({min(v):.2f}-{max(v):.2f})" for k, v in ratios.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-completion-length", type=int, default=32, help="tokens per completion at most")
    p.add_argument("--micro-batch", type=int, default=4, help="completions per forward/backward")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (aligner compiles its decode step)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each library's process")
    p.add_argument("--engine-slots", type=int, default=0,
                   help="aligner's generation.max_batch_size; 0: as conf/grpo.yaml and the schema set it")
    p.add_argument("--sample-eos", action="store_true", help="let completions stop at EOS (lengths then differ)")
    p.add_argument("--data", default=str(REPO / "examples/data/arithmetic_train.jsonl"))
    p.add_argument("--child", choices=["aligner", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    n = args.prompts * args.num_generations
    if n % args.micro_batch:
        raise SystemExit(f"--prompts x --num-generations = {n} completions is not a multiple of --micro-batch "
                         f"{args.micro_batch}")
    if len(read_jsonl(args.data)) < args.prompts * (args.warmup + args.steps):
        raise SystemExit(f"{args.data} has fewer than --prompts x (--warmup + --steps) records")
    print(environment(args.threads), flush=True)
    child_args = ["--precision", args.precision, "--data", args.data] + (["--sample-eos"] if args.sample_eos else [])
    for name in ("prompts", "num_generations", "max_completion_length", "micro_batch", "steps", "warmup", "threads",
                 "engine_slots"):
        child_args += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    run = run_benchmark(__file__, child_args, args.warmup, args.steps, 1, args.precision)[0]
    for r in run.values():  # lockstep cut the warm-up from its own per-step lists only
        r["generation_seconds"] = r["generation_seconds"][args.warmup:]
        r.get("breakdown", {}).update({k: v[args.warmup:] for k, v in r.get("breakdown", {}).items()})
    print_table(run, args)
    print(f"finished {time.strftime('%H:%M')}, load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
