"""Forward+backward tokens/s of our SmolLM2 against Hugging Face transformers' model, in one run.

    python bench/train_step.py [--batch 8] [--seq 512] [--steps 3] [--dtype float32|bfloat16]

Both models hold the same weights (the converted SmolLM2-135M-Instruct), see the same random
tokens and compute the same loss (next-token cross-entropy in float32). Timed steps alternate
between the two so that machine noise hits both alike. Prints a table with the ratio, the
achieved FLOP/s and the fraction of the measured matmul peak.
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


def step(model, tokens: torch.Tensor, logits_of) -> float:
    """One forward+backward; returns seconds."""
    _sync()
    start = time.perf_counter()
    logits = logits_of(model, tokens)  # [B, T, V]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    _sync()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after one warm-up)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    path = fetch_model("smollm2-135m-instruct")
    ours = from_pretrained(path, dtype=args.dtype, device=device).train()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).train()
    tokens = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq),
                           generator=torch.Generator().manual_seed(0)).to(device)
    runners = {
        "aligner": (ours, lambda m, t: m(t)),
        "transformers": (hf, lambda m, t: m(input_ids=t, use_cache=False).logits),
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    for name, (model, fn) in runners.items():  # warm-up
        step(model, tokens, fn)
    for _ in range(args.steps):
        for name, (model, fn) in runners.items():
            gc.collect()
            times[name].append(step(model, tokens, fn))

    peak = matmul_peak_flops(dtype)
    ntok = args.batch * args.seq
    flops = train_flops_per_token(ours.config, args.seq) * ntok
    print(f"\nforward+backward, SmolLM2-135M, batch {args.batch} x {args.seq} tokens, {args.dtype}, "
          f"{device}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'model':<14}{'s/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'of peak':>10}")
    rate = {}
    for name, ts in times.items():
        sec = statistics.median(ts)
        rate[name] = ntok / sec
        print(f"{name:<14}{sec:>10.3f}{rate[name]:>12.0f}{flops / sec / 1e12:>10.3f}{flops / sec / peak:>10.1%}")
    print(f"measured {args.dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s")
    print(f"speed-up aligner / transformers: {rate['aligner'] / rate['transformers']:.2f}x")


if __name__ == "__main__":
    main()
