"""Rollout tokens/s of our built-in engine against Hugging Face transformers' ``generate``, in one run.

    python bench/generation.py [--batches 1,16,64] [--new-tokens 128] [--reps 3] [--dtype auto|float32|bfloat16]
                               [--threads N]

SmolLM2-135M-Instruct, chat prompts of 30-45 tokens, pure sampling (temperature 1, top-k 0, top-p 1)
and exactly ``--new-tokens`` per sequence on both sides (``ignore_eos`` for ours, ``min_new_tokens``
for transformers), both models in the same dtype. For each batch size (= number of prompts; the
engine gets that many KV-cache slots) the timed calls alternate between the two, so machine noise
hits both alike, and the median is reported. tokens/s counts generated tokens over the whole call
(prefill included). Also printed, for our decode step (decode time = a full call minus a 1-token
call): its memory-bandwidth bound (weight bytes + the KV-cache bytes it must read, over the measured
copy bandwidth), its compute bound (matmul FLOPs over the measured matmul peak in this dtype), and
the fraction of the larger of the two (the roofline) that it reaches.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from aligner.generation.engine import SamplingParams
from aligner.generation.torch_engine import TorchEngine, generation_dtype
from aligner.models import from_pretrained
from aligner.models.fetch import smollm2_path
from aligner.models.tokenizer import load_tokenizer

TOPICS = ["photosynthesis", "the French revolution", "black holes", "compound interest", "the immune system",
          "volcanoes", "machine learning", "the Roman empire", "climate change", "prime numbers", "jazz music",
          "the water cycle", "electric cars", "honey bees", "the internet", "chess openings"]
FORMS = ["Explain {} in one paragraph.", "Write a short poem about {}.", "What are three surprising facts about {}?",
         "Give a beginner a step-by-step guide to understanding {}, with an example."]


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """``count`` distinct single-turn chat prompts, rendered with the model's chat template."""
    questions = [form.format(topic) for form in FORMS for topic in TOPICS]
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                           add_generation_prompt=True))
            for q in questions[:count]]


def copy_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (each byte read once and written once, both counted)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times)


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of a square matmul in ``dtype``: the practical compute peak of a decode step's matmuls."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def decode_step_flops(model, batch: int) -> float:
    """Matmul FLOPs of one decode step: 2 per weight per row (attention scores are negligible here)."""
    return 2.0 * batch * sum(p.numel() for p in model.parameters())


def decode_step_bytes(model, batch: int, prompt_len: float, new_tokens: int, dtype: torch.dtype) -> float:
    """Bytes a decode step must read at the least: every weight once (a tied embedding once, as the LM
    head), plus the KV cache of each row up to its current length (averaged over the response)."""
    size = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in model.parameters()) * size
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * size
    return weights + batch * (prompt_len + new_tokens / 2) * per_token


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """Seconds for transformers' ``generate`` on left-padded ``prompts`` (pure sampling, fixed length)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + new_tokens, f"transformers generated {out.shape[1] - width} tokens"
    return elapsed


def ours_generate(engine: TorchEngine, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for our engine on ``prompts`` (pure sampling, fixed length)."""
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    rollouts = engine.generate(prompts, sampling)
    elapsed = time.perf_counter() - start
    assert set(rollouts.response_lengths) == {new_tokens}, rollouts.response_lengths
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes (prompts per call)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3, help="timed calls per engine and batch size (after a warm-up)")
    p.add_argument("--dtype", default="auto", help="auto: what the engine picks on this device (both sides)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--no-compile", action="store_true", help="run our decode step eagerly")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = smollm2_path()
    tokenizer = load_tokenizer(path)
    dtype = generation_dtype(args.dtype, device, torch.float32)
    dtype_name = str(dtype).removeprefix("torch.")
    ours = from_pretrained(path, dtype=dtype_name, device=str(device)).eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    bandwidth, peak = copy_bandwidth(), matmul_peak(dtype)
    batches = [int(b) for b in args.batches.split(",")]
    prompts_all = chat_prompts(tokenizer, max(batches))
    N = args.new_tokens
    print(f"SmolLM2-135M-Instruct, {N} new tokens, pure sampling, {dtype_name}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"median of {args.reps}; copy bandwidth {bandwidth / 1e9:.1f} GB/s, matmul peak {peak / 1e9:.0f} GFLOP/s",
          flush=True)
    rows = []
    for batch in batches:
        prompts = prompts_all[:batch]
        engine = TorchEngine(ours, tokenizer, max_batch_size=batch, dtype=dtype, compile=not args.no_compile)
        start = time.perf_counter()
        ours_generate(engine, prompts, N)  # warm-up: compiles the decode step for this batch size
        warm = time.perf_counter() - start
        hf_generate(hf, prompts, 2, tokenizer.pad_id)
        t_ours, t_hf, t_prefill = [], [], []
        with torch.no_grad():
            for _ in range(args.reps):
                gc.collect()
                t_ours.append(ours_generate(engine, prompts, N))
                t_prefill.append(ours_generate(engine, prompts, 1))
                gc.collect()
                t_hf.append(hf_generate(hf, prompts, N, tokenizer.pad_id))
        ours_s, hf_s = statistics.median(t_ours), statistics.median(t_hf)
        step_s = (ours_s - statistics.median(t_prefill)) / (N - 1)
        prompt_len = sum(map(len, prompts)) / batch
        memory_s = decode_step_bytes(ours, batch, prompt_len, N, dtype) / bandwidth
        compute_s = decode_step_flops(ours, batch) / peak
        rows.append((batch, batch * N / ours_s, batch * N / hf_s, hf_s / ours_s, step_s * 1e3, memory_s * 1e3,
                     compute_s * 1e3, max(memory_s, compute_s) / step_s, warm))
        engine.close()
        print(f"batch {batch}: ours {batch * N / ours_s:.1f} tok/s, transformers {batch * N / hf_s:.1f} tok/s "
              f"({hf_s / ours_s:.2f}x)", flush=True)
    print(f"\n{'batch':>5}{'ours tok/s':>12}{'HF tok/s':>10}{'speed-up':>10}{'decode ms/step':>16}"
          f"{'memory bound':>14}{'compute bound':>15}{'of roofline':>13}{'warm-up s':>11}")
    for batch, ours_rate, hf_rate, ratio, step_ms, memory_ms, compute_ms, frac, warm in rows:
        print(f"{batch:>5}{ours_rate:>12.1f}{hf_rate:>10.1f}{ratio:>9.2f}x{step_ms:>16.1f}{memory_ms:>14.1f}"
              f"{compute_ms:>15.1f}{frac:>13.0%}{warm:>11.1f}")
    print("(bounds in ms per decode step; warm-up: our first call, which compiles the decode step)")


if __name__ == "__main__":
    main()
