"""Typed schema of the sections every job shares: model, parallel layout, trainer, optimizer, data, logging.

Every default of the toolkit lives here and nowhere else: YAML files under ``conf/`` hold only what
differs, and code reads ``cfg.section.key`` without fallbacks. A ``str`` field that accepts a fixed set
of values declares it with :func:`choice`; ``aligner.config.load`` checks those after composition
(OmegaConf has no ``Literal`` type).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import MISSING

from aligner.generation.engine import SamplingParams

DTYPES = ("float32", "bfloat16", "float16")


def choice(default: str, *choices: str) -> Any:
    """A ``str`` dataclass field whose value must be one of ``choices`` (checked at load time)."""
    assert default in choices, (default, choices)
    return field(default=default, metadata={"choices": choices})


@dataclass
class ArchConfig:
    """An inline architecture, named like Hugging Face's ``config.json`` (and ``TransformerConfig``).

    Used where there is no checkpoint to read it from: ``aligner plan``, random-init tests. The sizes
    are required; a ``null`` switch means the model family's default (``aligner.models.TransformerConfig``
    and ``config_from_hf``, e.g. ``model_type: qwen2`` implies ``attention_bias``).
    """

    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: Optional[int] = None  # null: equal to num_attention_heads (no GQA)
    head_dim: Optional[int] = None
    rms_norm_eps: Optional[float] = None
    rope_theta: Optional[float] = None
    rope_scaling: Optional[dict[str, Any]] = None  # HF dict, e.g. {rope_type: llama3, factor: 8.0, ...}
    max_position_embeddings: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None
    attention_bias: Optional[bool] = None
    qk_norm: Optional[bool] = None
    sliding_window: Optional[int] = None
    model_type: Optional[str] = None  # llama | mistral | qwen2 | qwen3
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None  # an id or a list of ids
    pad_token_id: Optional[int] = None


@dataclass
class ModelConfig:
    """Which weights to train and in what precision."""

    path: Optional[str] = None  # Hugging Face checkpoint directory; its config.json is the architecture
    dtype: str = choice("float32", *DTYPES)  # dtype the weights are loaded and kept in
    arch: Optional[ArchConfig] = None  # architecture when there is no checkpoint (conf/model/*.yaml)


@dataclass
class ParallelConfig:
    """The parallel layout: world size = tp * pp * dp_replicate * dp_shard."""

    tp: int = 1  # tensor parallel degree (heads, KV heads, vocab and intermediate size must divide by it)
    pp: int = 1  # pipeline stages (num_hidden_layers must divide by it)
    dp_shard: int = -1  # FSDP shards; -1 fills what the other dims leave of the world size
    dp_replicate: int = 1  # replicas of the sharded model (HSDP when dp_shard > 1)
    pp_schedule: str = choice("1F1B", "1F1B", "GPipe", "Interleaved1F1B")
    # Micro-batches one pipeline schedule run processes; -1: all of the step's micro-batches,
    # i.e. global_batch_size / (micro_batch_size * dp).
    pp_microbatches: int = -1
    activation_checkpointing: str = choice("none", "none", "full", "selective")
    sequence_parallel: bool = True  # with tp > 1: norms and the residual stream sharded over the sequence
    mixed_precision: str = choice("float32", "float32", "bfloat16")  # compute dtype under FSDP
    optimizer_offload: bool = False  # keep AdamW state on the CPU between steps
    # The cluster, for `aligner plan` (a running job takes its world size from its processes).
    nodes: int = 1
    gpus_per_node: int = 1


@dataclass
class TrainerConfig:
    """Loop lengths, batch sizes, checkpointing and the output directory."""

    max_steps: int = -1  # -1: run max_epochs epochs
    max_epochs: int = 1
    global_batch_size: int = 8  # examples per optimizer step, summed over data-parallel ranks
    micro_batch_size: int = 1  # examples per forward/backward on one rank
    max_seq_len: int = 1024
    val_check_interval: int = 50  # steps between validation runs
    save_interval: int = 100  # steps between checkpoints
    output_dir: str = "outputs"
    resume: str = "auto"  # auto (latest checkpoint in output_dir, if any) | never | a checkpoint path
    seed: int = 1234
    save_top_k: int = 2  # checkpoints kept (the most recent); -1 keeps all
    val_samples: int = 4  # held-out prompts answered in the sample table at each validation; 0 = none
    sample_max_new_tokens: int = 48  # length cap of those sample responses


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warmup, then constant, linear or cosine decay to min_lr."""

    name: str = choice("cosine", "constant", "linear", "cosine")
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class OptimConfig:
    """AdamW and gradient clipping."""

    name: str = choice("adamw", "adamw")
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class DataConfig:
    """Dataset files (JSONL, Parquet or a `datasets` directory)."""

    train: Optional[str] = None
    validation: Optional[str] = None
    prompts: Optional[str] = None  # prompt records ({"prompt": ..., <extra columns>}) for generation and online RL
    validation_split: float = 0.0  # share of data.train held out for validation (seeded) when validation is null
    overlong: str = choice("truncate", "truncate", "drop")  # examples over trainer.max_seq_len: keep the start, or drop
    empty_response: str = choice("error", "error", "skip")  # a record whose response is empty: stop, or skip it
    # A preference pair whose chosen equals its rejected (same rendered text): stop, or skip it (counted).
    identical_pairs: str = choice("error", "error", "skip")
    # DPO, CPO, ORPO, SimPO: one row per pair, [prompt | chosen | rejected], chosen and rejected sharing the
    # prompt's forward (same losses; ~1.6x fewer tokens on prompt-heavy data). false: two rows per pair.
    shared_prompt: bool = True
    cache_dir: Optional[str] = None  # tokenized-data cache; null: $ALIGNER_CACHE/data, else ~/.cache/aligner/data


@dataclass
class WandbConfig:
    mode: str = choice("disabled", "disabled", "offline", "online")
    project: str = "aligner"
    name: Optional[str] = None  # run name; null lets wandb choose


@dataclass
class LoggerConfig:
    """Where metrics go besides ``metrics.jsonl`` (always written)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False  # event files under <output_dir>/tensorboard/
    # Steps between console lines (when stderr is not a terminal), TensorBoard and wandb points;
    # metrics.jsonl gets every step, and val/ metrics are always forwarded.
    log_interval: int = 10
    progress_bar: bool = True  # step, loss, LR, tokens/s and ETA on rank 0's stderr


@dataclass
class PlanConfig:
    """Settings of the memory planner (``aligner plan``); they do not change training."""

    gpu_memory_gib: float = 80.0  # per-GPU memory the plan is checked against (H100/A100 80 GB)
    # SDPA's flash / memory-efficient kernels keep no [T, T] score matrix; set true for the math kernel.
    attention_scores_in_memory: bool = False


def _sampling_default(name: str) -> Any:
    """A ``field`` whose default is ``SamplingParams``'s, so each sampling default is written once."""
    default = getattr(SamplingParams(), name)
    if isinstance(default, list):
        return field(default_factory=lambda: list(getattr(SamplingParams(), name)))
    return field(default=default)


@dataclass
class TrtLlmConfig:
    """Settings only the TensorRT-LLM backend reads (``generation.backend=trtllm``, docs/generation.md)."""

    tensor_parallel_size: int = -1  # GPUs per TensorRT-LLM instance; -1: the training layout's parallel.tp
    kv_cache_memory_fraction: float = 0.5  # share of free GPU memory its KV cache takes; lower it beside training
    refit_bucket_mb: int = 1024  # weights sent per update_weights call during a refit (bounds the extra memory)


@dataclass
class GenerationConfig:
    """The rollout engine and how it samples. The sampling defaults are ``SamplingParams``'s: pure sampling,
    as RL training needs (docs/generation.md explains why top-k, top-p and a minimum length are off)."""

    backend: str = choice("torch", "torch", "trtllm")  # built-in KV-cache engine, or TensorRT-LLM (GPU container)
    # Most sequences decoded at once (KV-cache slots): a call allocates one per sample up to this, rounded up to a
    # power of two; finished slots take waiting samples.
    max_batch_size: int = 64
    compile: bool = True  # torch.compile the decode step (CUDA graphs on GPU; TensorRT-LLM: its CUDA graphs)
    dtype: str = choice("auto", "auto", *DTYPES)  # auto: bfloat16 where the device supports it, else model.dtype
    temperature: float = _sampling_default("temperature")  # 0 = greedy
    top_k: int = _sampling_default("top_k")  # 0 = off
    top_p: float = _sampling_default("top_p")  # 1.0 = off
    max_new_tokens: int = _sampling_default("max_new_tokens")
    min_new_tokens: int = _sampling_default("min_new_tokens")  # 0 = off
    stop_token_ids: list[int] = _sampling_default("stop_token_ids")  # besides the tokenizer's EOS
    stop_strings: list[str] = _sampling_default("stop_strings")  # checked on the decoded response
    n: int = _sampling_default("n")  # samples per prompt
    seed: Optional[int] = _sampling_default("seed")  # null: unseeded
    ignore_eos: bool = _sampling_default("ignore_eos")  # always generate max_new_tokens (benchmarks)
    trtllm: TrtLlmConfig = field(default_factory=TrtLlmConfig)

    def sampling_params(self) -> SamplingParams:
        """These settings as the engines' :class:`SamplingParams` (validated there: a bad value raises
        ``ValueError`` naming the ``generation.*`` key)."""
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams) if hasattr(self, f.name)})
