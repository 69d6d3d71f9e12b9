"""``aligner plan``: check a parallel layout and estimate per-GPU memory and step FLOPs, with no processes.

The model is built on the meta device (no memory) and its parameters are walked to count what one GPU
of the largest pipeline stage holds after tensor parallelism (q/k/v/o, gate/up/down, embedding and LM
head over the vocabulary; norms replicated) and FSDP (``/ dp_shard``). Memory model, in bytes per
parameter held by a GPU (Megatron's distributed-optimizer accounting; FSDP2 keeps the fp32 master as
the sharded parameter itself, which moves bytes between rows but not the total):

- trained model, mixed precision bf16: params 2 + grads 2 + AdamW 12 (fp32 master + 2 moments);
  fp32: params 4 + grads 4 + AdamW 8 (2 moments). ``optimizer_offload``: AdamW 0 on the GPU.
- frozen model (DPO/PPO reference, PPO reward model): params only, 2 bytes under bf16. PPO's policy
  and critic are both trained (one backward over both losses, as TRL does), so both sets of
  gradients, optimizer state and activations count; the frozen models' forward passes run between
  training phases and add no activations of their own.
- activations per layer and micro-batch (Korthikanti et al. 2022, bf16): ``s*b*h*34`` bytes, ``/ tp``
  with sequence parallelism (``s*b*h*(10 + 24/tp)`` without), plus ``5*a*s*s*b / tp`` when the attention
  scores are materialised (``plan.attention_scores_in_memory``; SDPA's flash kernels do not). A layer
  under activation checkpointing keeps only its input, ``2*s*b*h`` (``/ tp`` with SP), and one layer's full
  activations exist during its recompute. ``selective`` checkpoints every ``ac_every_n``-th layer as
  ``aligner.parallel.parallelize_model`` does. 1F1B keeps ``pp - stage`` micro-batches in flight on a
  stage, GPipe all of them, Interleaved1F1B (2 stages per rank) 1F1B's times ``1 + (pp-1)/(2*pp)``.
- logits on the last stage: ``b * s * vocab / tp`` in the compute dtype plus an fp32 copy for the loss.
- FSDP working buffers: the largest unit (a layer, or the embedding / LM head) gathered twice in the
  compute dtype (current + prefetched) plus its fp32 gradient before reduce-scatter, ``/ tp``.

FLOPs: ``6 * N * tokens`` per trained pass, ``2 * N * tokens`` per no-grad forward (reference, reward,
rollout), attention ``12 * L * h * s`` per trained token (a third of it per forward-only token).
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
from dataclasses import dataclass, field

import torch

from aligner.config import ConfigError, DPOJobConfig, ModelConfig, PPOJobConfig, architecture_dict, load_config
from aligner.models import Transformer, TransformerConfig, attach_value_head, config_from_hf
from aligner.parallel.mesh import ParallelDims
from aligner.parallel.parallelize import parallelize_model

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_TP_SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "tok_embeddings")
AC_EVERY_N = inspect.signature(parallelize_model).parameters["ac_every_n"].default


@dataclass
class PlannedModel:
    """One model of the job as the planner sees it."""

    role: str  # "policy", "reference", "reward model", "critic"
    source: str  # where the architecture came from ("model.arch"), for messages
    arch: TransformerConfig
    trained: bool
    value_head: bool = False
    meta: torch.nn.Module | None = None


@dataclass
class PlanReport:
    """What ``aligner plan`` found: layout errors, or per-GPU memory (GiB) of the worst stage and FLOPs."""

    config_name: str
    algorithm: str
    world_size: int
    dims: ParallelDims | None
    total_params: int  # policy parameters (embeddings counted once when tied)
    capacity_gib: float  # plan.gpu_memory_gib
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stage_params_per_gpu: list[int] = field(default_factory=list)  # policy, per pipeline stage
    worst_stage: int = 0
    memory_gib: dict[str, float] = field(default_factory=dict)  # rows of the worst stage, "total" last
    memory_labels: dict[str, str] = field(default_factory=dict)  # row key -> text printed for it
    arch: TransformerConfig | None = None  # the policy's
    stage_totals_gib: list[float] = field(default_factory=list)
    flops: dict[str, tuple[float, float]] = field(default_factory=dict)  # step FLOPs by part: (dense, attention)
    tokens: int = 0  # tokens per step (both responses of a DPO pair)
    over_memory: str = ""  # what to change when the total exceeds capacity_gib; empty when it fits

    @property
    def step_flops(self) -> float:
        return sum(d + a for d, a in self.flops.values())

    @property
    def total_gib(self) -> float:
        return self.memory_gib.get("total", 0.0)

    @property
    def fits(self) -> bool:
        return not self.errors and self.total_gib <= self.capacity_gib


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, (limit or n) + 1) if n % d == 0]


def _stage_of(name: str, num_layers: int, pp: int) -> list[int]:
    """Pipeline stages holding the parameter ``name`` (a tied embedding lives on first and last)."""
    if name.startswith("layers."):
        return [int(name.split(".")[1]) // (num_layers // pp)]
    if name.startswith("tok_embeddings."):
        return [0]
    return [pp - 1]  # norm, output (LM head or value head)


def _per_gpu_numel(name: str, p: torch.Tensor, tp: int, dp_shard: int, value_head: bool) -> int:
    """Elements of ``p`` one GPU holds: TP splits dim 0 (or the vocab) of sharded weights, FSDP dim 0."""
    shape = list(p.shape)
    is_lm_head = name.startswith("output.") and not value_head
    if any(f".{k}." in f".{name}" for k in _TP_SHARDED) or is_lm_head:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            shape[1] = math.ceil(shape[1] / tp)  # row-parallel: input dim
        else:
            shape[0] = math.ceil(shape[0] / tp)
    shape[0] = math.ceil(shape[0] / dp_shard)
    return math.prod(shape)


def stage_param_counts(model: torch.nn.Module, num_layers: int, tp: int, pp: int, dp_shard: int,
                       value_head: bool = False) -> tuple[list[int], list[int]]:
    """(parameters per GPU on each stage, largest FSDP unit per stage in elements / tp) for ``model``."""
    per_stage = [0] * pp
    seen: list[set[int]] = [set() for _ in range(pp)]
    units: dict[tuple[int, str], int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        for s in _stage_of(name, num_layers, pp):
            if id(p) in seen[s]:
                continue  # tied weights on one stage count once
            seen[s].add(id(p))
            per_stage[s] += _per_gpu_numel(name, p, tp, dp_shard, value_head)
            unit = ".".join(name.split(".")[:2]) if name.startswith("layers.") else name.split(".")[0]
            units[(s, unit)] = units.get((s, unit), 0) + _per_gpu_numel(name, p, tp, 1, value_head)
    largest_unit = [max((n for (s, _), n in units.items() if s == st), default=0) for st in range(pp)]
    return per_stage, largest_unit


def _arch(model: ModelConfig, section: str, fallback: tuple[TransformerConfig, str] | None,
          notes: list[str], fallback_text: str) -> tuple[TransformerConfig, str]:
    """(architecture of ``model``, the key it came from); ``fallback`` when it has neither path nor arch."""
    source = f"{section}.arch" if model.arch is not None else f"config.json of {section}.path"
    try:
        return config_from_hf(architecture_dict(model, section), source=source), source
    except (FileNotFoundError, ValueError):
        if fallback is None or model.arch is not None:
            raise
        where = f"no config.json at {section}.path={model.path}" if model.path else "no path or arch"
        notes.append(f"{section}: {where}; planned with {fallback_text}")
        return fallback


def planned_models(cfg) -> tuple[list[PlannedModel], list[str]]:
    """The models a job holds on its GPUs (policy first) and notes on assumptions made."""
    notes: list[str] = []
    policy, source = _arch(cfg.model, "model", None, notes, "")
    models = [PlannedModel("policy", source, policy, trained=True)]
    if isinstance(cfg, (DPOJobConfig, PPOJobConfig)):
        models.append(PlannedModel("reference", source, policy, trained=False))
    if isinstance(cfg, PPOJobConfig):
        reward = _arch(cfg.ppo.reward_model, "ppo.reward_model", (policy, source), notes, "the policy's architecture")
        critic = _arch(cfg.ppo.critic, "ppo.critic", reward, notes,
                       "the reward model's architecture (the critic starts from it)")
        models.append(PlannedModel("reward model", reward[1], reward[0], trained=False, value_head=True))
        models.append(PlannedModel("critic", critic[1], critic[0], trained=True, value_head=True))
    return models, notes


def _fitting(sizes: list[int], world: int, others: int) -> list[int]:
    """The ``sizes`` that also fit the world size next to the other dims (all of them if none does)."""
    fit = [n for n in sizes if world % (n * others) == 0]
    return fit or sizes


def _values(xs) -> str:
    return ", ".join(map(str, xs))


def check_layout(cfg, models: list[PlannedModel]) -> tuple[ParallelDims | None, list[str], list[str]]:
    """Every divisibility rule of the layout: (resolved dims or None, errors, warnings)."""
    par, tr = cfg.parallel, cfg.trainer
    errors, warnings = [], []
    positive = {"parallel.tp": par.tp, "parallel.pp": par.pp, "parallel.dp_replicate": par.dp_replicate,
                "parallel.nodes": par.nodes, "parallel.gpus_per_node": par.gpus_per_node,
                "trainer.micro_batch_size": tr.micro_batch_size, "trainer.global_batch_size": tr.global_batch_size}
    errors += [f"{key}={value} must be >= 1" for key, value in positive.items() if value < 1]
    if errors:
        return None, errors, warnings
    world = par.nodes * par.gpus_per_node
    for m in models:
        if m.role == "reference":
            continue  # the policy's architecture, checked with it
        a = m.arch
        rules = [("num_attention_heads", a.num_attention_heads), ("num_key_value_heads", a.num_key_value_heads),
                 ("intermediate_size", a.intermediate_size)] + ([] if m.value_head else [("vocab_size", a.vocab_size)])
        ok_tp = _fitting(_divisors(math.gcd(*(v for _, v in rules)), world), world, par.pp * par.dp_replicate)
        for key, value in rules:
            if value % par.tp:
                errors.append(f"parallel.tp={par.tp} does not divide {m.source}.{key}={value} ({m.role}); "
                              f"valid parallel.tp values: {_values(ok_tp)}")
        if a.num_hidden_layers % par.pp:
            ok_pp = _fitting(_divisors(a.num_hidden_layers, min(world, a.num_hidden_layers)), world,
                             par.tp * par.dp_replicate)
            errors.append(f"parallel.pp={par.pp} does not divide {m.source}.num_hidden_layers={a.num_hidden_layers} "
                          f"({m.role}); valid parallel.pp values: {_values(ok_pp)}")
    try:
        dims = ParallelDims(dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, pp=par.pp, tp=par.tp,
                            world_size=world)
    except ValueError as e:
        others = par.tp * par.pp * par.dp_replicate
        hint = (f"parallel.dp_shard={world // others} or -1" if world % others == 0 else
                f"parallel.tp * parallel.pp * parallel.dp_replicate ({others}) must divide {world}")
        errors.append(f"{e} (world size = parallel.nodes {par.nodes} x parallel.gpus_per_node "
                      f"{par.gpus_per_node} = {world}); what works: {hint}")
        return None, errors, warnings
    per_step = tr.micro_batch_size * dims.dp
    if tr.global_batch_size % per_step:
        lo = tr.global_batch_size // per_step * per_step
        works = [v for v in (lo, lo + per_step) if v > 0]
        micro_ok = _divisors(tr.global_batch_size // dims.dp) if tr.global_batch_size % dims.dp == 0 else []
        errors.append(
            f"trainer.global_batch_size={tr.global_batch_size} is not a multiple of trainer.micro_batch_size "
            f"({tr.micro_batch_size}) x data-parallel size dp_replicate * dp_shard ({dims.dp}) = {per_step}; "
            f"values that work: trainer.global_batch_size={' or '.join(map(str, works))} (any multiple of {per_step})"
            + (f", or trainer.micro_batch_size in {_values(micro_ok)}" if micro_ok else ""))
    elif par.pp > 1:
        n_micro = tr.global_batch_size // per_step
        if par.pp_microbatches > 0 and n_micro % par.pp_microbatches:
            errors.append(f"parallel.pp_microbatches={par.pp_microbatches} does not divide the {n_micro} "
                          f"micro-batches of a step (global_batch_size / (micro_batch_size * dp)); valid: "
                          f"{_values(_divisors(n_micro))} or -1")
        elif (par.pp_microbatches if par.pp_microbatches > 0 else n_micro) < par.pp:
            warnings.append(f"only {n_micro} micro-batches per pipeline run for parallel.pp={par.pp}: stages idle "
                            f"most of the step; raise trainer.global_batch_size or lower trainer.micro_batch_size")
    if par.tp > par.gpus_per_node:
        warnings.append(f"parallel.tp={par.tp} spans nodes (parallel.gpus_per_node={par.gpus_per_node}); tensor "
                        f"parallel communicates every layer and belongs inside a node")
    return dims, errors, warnings


def _bytes_per_element(cfg) -> tuple[int, int]:
    """(bytes of a parameter, gradient or activation element; bytes of AdamW state per parameter)."""
    mixed_bf16 = cfg.parallel.mixed_precision == "bfloat16"
    dtype = DTYPE_BYTES[cfg.model.dtype]
    optim = 0 if cfg.parallel.optimizer_offload else (12 if mixed_bf16 else 2 * dtype)
    return (2 if mixed_bf16 else dtype), optim


def _layer_activation_bytes(cfg, arch: TransformerConfig, seqs: int, checkpointed: bool, compute_bytes: int) -> float:
    """Bytes one layer keeps for backward for one micro-batch of ``seqs`` sequences on one GPU."""
    s, h, a, t = cfg.trainer.max_seq_len, arch.hidden_size, arch.num_attention_heads, cfg.parallel.tp
    sp = cfg.parallel.sequence_parallel and t > 1
    sbh = s * seqs * h
    scale = compute_bytes / 2  # the formula counts 2-byte (bf16) activations
    if checkpointed:
        return 2 * sbh * scale / (t if sp else 1)
    linear = 34 * sbh / t if sp else sbh * (10 + 24 / t)
    scores = 5 * a * s * s * seqs / t if cfg.plan.attention_scores_in_memory else 0.0
    return (linear + scores) * scale


def _in_flight(cfg, stage: int, n_micro: int) -> float:
    """Micro-batches whose activations a pipeline stage holds at its peak."""
    pp, schedule = cfg.parallel.pp, cfg.parallel.pp_schedule
    if pp == 1:
        return 1
    if schedule == "GPipe":
        return n_micro
    base = min(pp - stage, n_micro)
    return base * (1 + (pp - 1) / (2 * pp)) if schedule == "Interleaved1F1B" else base


def _stage_activation_bytes(cfg, arch: TransformerConfig, stage: int, seqs: int, n_micro: int, cb: int) -> float:
    """Activation bytes of ``stage`` at its peak: in-flight micro-batches plus one layer's recompute."""
    per_stage = arch.num_hidden_layers // cfg.parallel.pp
    layer_ids = range(stage * per_stage, (stage + 1) * per_stage)
    mode = cfg.parallel.activation_checkpointing
    ckpt = [mode == "full" or (mode == "selective" and i % AC_EVERY_N == 0) for i in layer_ids]
    full = _layer_activation_bytes(cfg, arch, seqs, False, cb)
    kept = sum(_layer_activation_bytes(cfg, arch, seqs, c, cb) for c in ckpt)
    return _in_flight(cfg, stage, n_micro) * kept + (full if any(ckpt) else 0.0)


def _matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: all but the embedding lookup (a tied LM head counts)."""
    return sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith("tok_emb"))


def step_flops(cfg, models: list[PlannedModel]) -> tuple[dict[str, tuple[float, float]], int]:
    """FLOPs of one optimizer step by part as (dense ``2|6 * N * tokens``, attention), and the tokens."""
    s = cfg.trainer.max_seq_len
    seqs = 2 if isinstance(cfg, DPOJobConfig) else 1  # DPO runs chosen and rejected
    tokens = cfg.trainer.global_batch_size * seqs * s

    def fwd(m: PlannedModel, times: float = 1.0) -> tuple[float, float]:
        a = m.arch
        return times * 2 * _matmul_params(m.meta) * tokens, times * 4 * a.num_hidden_layers * a.hidden_size * s * tokens

    def train(m: PlannedModel, times: float = 1.0) -> tuple[float, float]:
        dense, attn = fwd(m, times)
        return 3 * dense, 3 * attn

    by_role = {m.role: m for m in models}
    parts: dict[str, tuple[float, float]] = {}
    if isinstance(cfg, PPOJobConfig):
        epochs = cfg.ppo.num_ppo_epochs
        parts["rollout generation (policy forward)"] = fwd(by_role["policy"])
        parts["policy log-probs (no grad)"] = fwd(by_role["policy"])
        parts["reference forward"] = fwd(by_role["reference"])
        parts["reward model forward"] = fwd(by_role["reward model"])
        parts["critic values (no grad)"] = fwd(by_role["critic"])
        parts[f"policy training x{epochs} epochs"] = train(by_role["policy"], epochs)
        parts[f"critic training x{epochs} epochs"] = train(by_role["critic"], epochs)
    else:
        parts["policy training"] = train(by_role["policy"])
        if "reference" in by_role:
            parts["reference forward"] = fwd(by_role["reference"])
    return parts, tokens


def plan_layout(cfg, config_name: str = "") -> PlanReport:
    """Check the layout of job config ``cfg`` and estimate per-GPU memory of its largest stage and step FLOPs.

    Layout errors are returned in ``report.errors`` (nothing is raised for them); a config without an
    architecture raises ValueError / FileNotFoundError naming the key.
    """
    models, notes = planned_models(cfg)
    par, tr = cfg.parallel, cfg.trainer
    world = par.nodes * par.gpus_per_node
    algorithm = {DPOJobConfig: "DPO", PPOJobConfig: "PPO"}.get(type(cfg), "SFT")
    report = PlanReport(config_name=config_name, algorithm=algorithm, world_size=world, dims=None,
                        total_params=models[0].arch.num_params, notes=notes, capacity_gib=cfg.plan.gpu_memory_gib,
                        arch=models[0].arch)
    dims, report.errors, report.warnings = check_layout(cfg, models)
    report.dims = dims
    if report.errors or dims is None:
        return report
    for m in models:
        with torch.device("meta"):  # shapes only: no memory, any size
            m.meta = Transformer(m.arch)
            if m.value_head:
                attach_value_head(m.meta)
    cb, optim_bytes = _bytes_per_element(cfg)
    seqs = tr.micro_batch_size * (2 if algorithm == "DPO" else 1)
    n_micro = tr.global_batch_size // (tr.micro_batch_size * dims.dp)
    if par.pp_microbatches > 0:
        n_micro = par.pp_microbatches
    counts = {id(m): stage_param_counts(m.meta, m.arch.num_hidden_layers, par.tp, par.pp, dims.dp_shard, m.value_head)
              for m in models}
    report.stage_params_per_gpu = counts[id(models[0])][0]
    mp = "bf16" if cb == 2 else "fp32"
    optim = ("offloaded to CPU" if par.optimizer_offload else
             "fp32 master + 2 moments" if par.mixed_precision == "bfloat16" else "2 moments")
    stages, stage_labels = [], []
    for st in range(par.pp):
        rows: dict[str, float] = {}
        labels: dict[str, str] = {}
        for m in models:
            params, unit = counts[id(m)][0][st], counts[id(m)][1][st]
            key = m.role.replace(" ", "_")
            if not m.trained:
                rows[key], labels[key] = params * cb, f"{m.role} (parameters, {mp})"
                continue
            prefix, shown = ("", "") if m.role == "policy" else (f"{key}_", f"{m.role} ")
            rows[prefix + "parameters"] = params * cb
            rows[prefix + "gradients"] = params * cb
            rows[prefix + "optimizer"] = params * optim_bytes
            rows[prefix + "activations"] = _stage_activation_bytes(cfg, m.arch, st, seqs, n_micro, cb)
            labels[prefix + "parameters"] = f"{shown}parameters ({mp})"
            labels[prefix + "gradients"] = f"{shown}gradients ({mp})"
            labels[prefix + "optimizer"] = f"{shown}optimizer ({optim})"
            labels[prefix + "activations"] = (f"{shown}activations ({par.activation_checkpointing} ckpt, {seqs}x"
                                              f"{tr.max_seq_len} tokens, {_in_flight(cfg, st, n_micro):g} in flight)")
            if st == par.pp - 1 and not m.value_head:
                rows[prefix + "logits"] = seqs * tr.max_seq_len * m.arch.vocab_size / par.tp * (cb + 4)
                labels[prefix + "logits"] = (f"{shown}logits ({seqs}x{tr.max_seq_len}x{m.arch.vocab_size}/tp, "
                                             f"{mp} + fp32 copy)")
            if dims.dp_shard > 1:
                rows[prefix + "fsdp_buffers"] = unit * (2 * cb + 4)
                labels[prefix + "fsdp_buffers"] = f"{shown}FSDP buffers (2 gathered units + fp32 grad)"
        rows["total"] = sum(rows.values())
        stages.append({k: v / GIB for k, v in rows.items()})
        stage_labels.append(labels)
    report.stage_totals_gib = [s["total"] for s in stages]
    report.worst_stage = max(range(par.pp), key=lambda i: report.stage_totals_gib[i])
    report.memory_gib = stages[report.worst_stage]
    report.memory_labels = stage_labels[report.worst_stage]
    report.flops, report.tokens = step_flops(cfg, models)
    if algorithm == "PPO":
        # Rollouts run while training activations are freed, so the KV cache is reported, not added.
        a = models[0].arch
        seqs_per_rank = tr.global_batch_size // dims.dp
        kv = (seqs_per_rank * tr.max_seq_len * (a.num_hidden_layers // par.pp) * 2 * (a.num_key_value_heads // par.tp)
              * a.head_dim * cb)
        report.notes.append(f"rollout phase: the KV cache of {seqs_per_rank} sequences x {tr.max_seq_len} tokens takes "
                            f"{kv / GIB:.2f} GiB per GPU, in the room training activations leave")
    if report.total_gib > report.capacity_gib:
        report.over_memory = (
            f"stage {report.worst_stage} needs {report.total_gib:.1f} GiB per GPU, over plan.gpu_memory_gib="
            f"{report.capacity_gib:g}; try parallel.activation_checkpointing=full, a larger parallel.tp / parallel.pp "
            f"/ dp_shard, trainer.micro_batch_size=1 or parallel.optimizer_offload=true")
    elif report.total_gib > 0.9 * report.capacity_gib:
        report.warnings.append(f"{report.total_gib:.1f} GiB is over 90% of plan.gpu_memory_gib="
                               f"{report.capacity_gib:g}: little room for the CUDA context and allocator fragmentation")
    return report


def format_report(report: PlanReport, cfg) -> str:
    """The table ``aligner plan`` prints."""
    par, tr, a = cfg.parallel, cfg.trainer, report.arch
    d = report.dims
    lines = [
        f"aligner plan: {report.config_name} ({report.algorithm})",
        f"  model     {a.model_type}, {report.total_params / 1e9:.2f}B parameters, {a.num_hidden_layers} layers, "
        f"hidden {a.hidden_size}, {a.num_attention_heads} heads / {a.num_key_value_heads} KV heads, "
        f"vocab {a.vocab_size}",
        f"  layout    {report.world_size} GPUs = {par.nodes} nodes x {par.gpus_per_node}: tp {d.tp} x pp {d.pp} x "
        f"dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard}",
        f"  batch     global {tr.global_batch_size} = micro {tr.micro_batch_size} x dp {d.dp} x "
        f"{tr.global_batch_size // (tr.micro_batch_size * d.dp)} accumulation; seq {tr.max_seq_len}"
        + (f"; {par.pp_schedule} over {par.pp} stages of {a.num_hidden_layers // par.pp} layers" if par.pp > 1 else ""),
        f"  policy parameters per GPU by stage: {', '.join(f'{n / 1e6:.1f}M' for n in report.stage_params_per_gpu)}",
        "",
        f"  per-GPU memory, stage {report.worst_stage} (the largest)".ljust(78) + "GiB",
    ]
    for key, gib in report.memory_gib.items():
        if key != "total":
            lines.append(f"    {report.memory_labels[key]:<72}{gib:7.2f}")
    lines.append(f"    {'total':<72}{report.total_gib:7.2f}")
    verdict = "fits" if report.fits else "DOES NOT FIT"
    lines.append(f"    {'capacity (plan.gpu_memory_gib)':<72}{report.capacity_gib:7.2f}  {verdict} "
                 f"({100 * report.total_gib / report.capacity_gib:.0f}%)")
    if len(report.stage_totals_gib) > 1:
        lines.append("    stage totals: " + ", ".join(f"{g:.1f}" for g in report.stage_totals_gib))
    lines += ["", f"  step FLOPs ({report.tokens:,} tokens)".ljust(60) + "dense TFLOP   attention TFLOP"]
    for key, (dense, attn) in report.flops.items():
        lines.append(f"    {key:<56}{dense / 1e12:11.1f}{attn / 1e12:18.1f}")
    total = report.step_flops / 1e12
    lines.append(f"    {'total (dense + attention)':<56}{total:11.1f}")
    lines.append(f"    {'per GPU':<56}{total / report.world_size:11.1f}")
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    """``aligner plan CONFIG [key=value ...] [--strict]``: print the plan; non-zero on a layout that cannot work."""
    p = argparse.ArgumentParser(
        prog="aligner plan",
        description="Check a parallel layout and print per-GPU memory and step FLOPs, without starting processes.",
        epilog="CONFIG is a name under conf/ (dpo, examples/llama3_70b_dpo) or a YAML path; overrides are "
               "Hydra key=value pairs, e.g. parallel.tp=8 parallel.pp=2 parallel.nodes=8 parallel.gpus_per_node=8 "
               "plan.gpu_memory_gib=141. Exit codes: 0 ok, 1 layout or config error (or over memory with --strict).")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when the plan exceeds plan.gpu_memory_gib (default: print a warning, exit 0)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        report = plan_layout(cfg, args.config)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"aligner plan: error: {e}", file=sys.stderr)
        return 1
    if report.errors:
        for line in [f"warning: {w}" for w in report.warnings] + [f"error: {e}" for e in report.errors]:
            print(f"aligner plan: {line}", file=sys.stderr)
        return 1
    print(format_report(report, cfg))
    for w in report.warnings:
        print(f"aligner plan: warning: {w}", file=sys.stderr)
    if report.over_memory:
        print(f"aligner plan: {'error' if args.strict else 'warning'}: {report.over_memory}", file=sys.stderr)
        return 1 if args.strict else 0
    return 0
