"""Forward+backward tokens/s of our SmolLM2 against Hugging Face transformers' model, in one run.

    python bench/train_step.py [--batch 8] [--seq 512] [--steps 3] [--precision both|float32|bfloat16]

Both models hold the same weights (the converted SmolLM2-135M-Instruct), see the same random
tokens and compute the same loss (next-token cross-entropy in float32 over pre-shifted labels).
Two precisions, each as its library trains in it:
  float32   plain float32 on both sides;
  bfloat16  float32 master weights with bf16 compute: ours through FSDP2's mixed-precision policy
            (``parallelize_model(mixed_precision="bfloat16")``, weights cast once per step), the
            peer through ``torch.autocast`` (weights cast per op, forward and backward).
Timed steps alternate between the two models so that machine noise hits both alike. Prints a
table with the ratio, the achieved FLOP/s and the fraction of the measured matmul peak.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F

from aligner.models import from_pretrained
from aligner.models.fetch import fetch_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_peak_flops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured FLOP/s of a square matmul: the practical peak the model's matmuls can reach here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    _sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_flops_per_token(cfg, seq: int) -> float:
    """6 x matmul parameters (the LM head counted even when tied) + causal attention scores and values."""
    embed = cfg.vocab_size * cfg.hidden_size
    matmul_params = cfg.num_params - embed * (1 if cfg.tie_word_embeddings else 2) + embed
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq  # 12*L*d*s/2 (causal)
    return 6 * matmul_params + attention


def step(model, tokens: torch.Tensor, labels: torch.Tensor, logits_of) -> float:
    """One forward+backward; returns seconds."""
    _sync()
    start = time.perf_counter()
    logits = logits_of(model, tokens)  # [B, T, V]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    loss.backward()
    _sync()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def build_runners(path: str, precision: str, device: str) -> dict:
    """(model, logits function) for ours and for transformers, set up as each trains in ``precision``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(device).train()
    if precision == "float32":
        ours = from_pretrained(path, dtype="float32", device=device).train()
        return {"aligner": (ours, lambda m, t: m(t)),
                "transformers": (hf, lambda m, t: m(input_ids=t, use_cache=False).logits)}
    from aligner.parallel import ParallelDims, build_mesh, build_parallel_model, init_distributed

    init_distributed()
    pmesh = build_mesh(ParallelDims(world_size=1))
    ours = build_parallel_model(path, pmesh, dtype="float32", mixed_precision="bfloat16")

    def hf_autocast(m, t):
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            return m(input_ids=t, use_cache=False).logits

    return {"aligner": (ours, lambda m, t: m(t)), "transformers": (hf, hf_autocast)}


def bench_precision(path: str, precision: str, args, device: str) -> float:
    """Run and print one precision's table; returns the aligner / transformers ratio."""
    runners = build_runners(path, precision, device)
    ours = runners["aligner"][0]
    vocab = 49152
    tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.cat([tokens[:, 1:], torch.full((args.batch, 1), -100, device=device)], dim=1)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for name, (model, fn) in runners.items():  # warm-up
        step(model, tokens, labels, fn)
    for _ in range(args.steps):
        for name, (model, fn) in runners.items():
            gc.collect()
            times[name].append(step(model, tokens, labels, fn))
    peak = matmul_peak_flops(DTYPES[precision])
    cfg = ours.config
    ntok = args.batch * args.seq
    flops = train_flops_per_token(cfg, args.seq) * ntok
    print(f"\nforward+backward, SmolLM2-135M, batch {args.batch} x {args.seq} tokens, {precision}, "
          f"{device}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'model':<14}{'s/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'of peak':>10}")
    rate = {}
    for name, ts in times.items():
        sec = statistics.median(ts)
        rate[name] = ntok / sec
        print(f"{name:<14}{sec:>10.3f}{rate[name]:>12.0f}{flops / sec / 1e12:>10.3f}{flops / sec / peak:>10.1%}")
    print(f"measured {precision} matmul peak: {peak / 1e12:.3f} TFLOP/s")
    ratio = rate["aligner"] / rate["transformers"]
    print(f"speed-up aligner / transformers ({precision}): {ratio:.2f}x")
    del runners
    gc.collect()
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after one warm-up)")
    p.add_argument("--precision", default="both", choices=["both", *DTYPES])
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = str(fetch_model("smollm2-135m-instruct"))
    precisions = list(DTYPES) if args.precision == "both" else [args.precision]
    ratios = {prec: bench_precision(path, prec, args, device) for prec in precisions}
    print("\nsummary: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
