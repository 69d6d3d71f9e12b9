"""Algorithm sections and the top-level schema of each job, registered in Hydra's ConfigStore.

A job schema is the shared sections (``aligner.config.schema``) plus the algorithm's own section,
named after the algorithm (``dpo.beta``, ``ppo.kl_coef``), made by :func:`job_schema`. The YAML
files in ``conf/`` start their defaults list with ``<algorithm>_schema`` so that Hydra types and
checks every key against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

# The judge's verdict formats are defined beside the parser that reads them (a leaf module, no imports).
from aligner.judges.parsing import DEFAULT_SCORE_REGEX, DEFAULT_WINNER_REGEX
from aligner.config.schema import (
    DataConfig,
    GenerationConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PlanConfig,
    TrainerConfig,
    choice,
)


@dataclass
class SFTConfig:
    """Supervised fine-tuning (loss on assistant tokens only)."""

    packing: bool = False  # several examples per row, attention kept inside each


# How a frozen reference model (the initial policy) is evaluated: its log-probs of the whole training and
# validation data in one no-grad pass before step 1, or each step with the initial weights swapped in from
# CPU memory (no extra pass, one more forward per step).
REFERENCE_MODES = ("precompute", "on_the_fly")


@dataclass
class RMConfig:
    """Reward model: a value head on the policy architecture, Bradley-Terry loss on preference pairs."""

    margin: bool = True  # subtract the record's "margin" column (when present) inside the Bradley-Terry loss


@dataclass
class DPOConfig:
    """Direct preference optimisation against a frozen reference model (the initial policy)."""

    beta: float = 0.1  # strength of the implicit KL to the reference
    loss_type: str = choice("sigmoid", "sigmoid", "ipo", "hinge")
    label_smoothing: float = 0.0  # conservative DPO: assumed fraction of flipped preference labels
    rpo_alpha: float = 1.0  # weight of the NLL on the chosen response (ms-swift's default); 0 gives plain DPO
    reference: str = choice("precompute", *REFERENCE_MODES)


@dataclass
class KTOConfig:
    """KTO on (prompt, completion, desirable?) records against a frozen reference model."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: str = choice("precompute", *REFERENCE_MODES)


@dataclass
class CPOConfig:
    """Contrastive preference optimisation: reference-free DPO-like loss plus NLL on the chosen response."""

    beta: float = 0.1
    loss_type: str = choice("sigmoid", "sigmoid", "hinge", "ipo")  # ipo works on length-averaged log-probs
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0  # weight of the NLL on the chosen response


@dataclass
class ORPOConfig:
    """Odds-ratio preference optimisation: NLL on chosen plus ``beta`` (ORPO's lambda) times the odds-ratio loss."""

    beta: float = 0.1


@dataclass
class SimPOConfig:
    """SimPO: length-normalised, reference-free, with a target margin ``gamma``."""

    beta: float = 2.0
    gamma: float = 1.0  # target reward margin
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0  # weight of CPO's NLL on the chosen response (ms-swift's default); 0 is original SimPO


@dataclass
class PPOConfig:
    """PPO with policy, reference, reward and critic (value) models in one job."""

    kl_coef: float = 0.05  # per-token KL penalty folded into the reward
    cliprange: float = 0.2  # policy ratio clip
    vf_coef: float = 0.1  # value loss weight
    cliprange_value: float = 0.2  # value prediction clip around the rollout values
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = False
    num_ppo_epochs: int = 4  # passes over each rollout batch
    num_mini_batches: int = 1  # optimizer steps per pass
    local_rollout_forward_batch_size: int = 64  # sequences per no-grad forward (reference, old log-probs, values, RM)
    response_length: int = 53  # max generated tokens
    temperature: float = 0.7
    missing_eos_penalty: Optional[float] = None  # subtracted from the score of a response without EOS
    stop_token: Optional[str] = None  # "eos": responses end at the first EOS even with generation.ignore_eos
    stop_token_id: Optional[int] = None  # a token id that ends responses too (not with stop_token)
    num_sample_generations: int = 10  # sample tables logged over the run
    reward_model: ModelConfig = field(default_factory=ModelConfig)  # a model with a value head
    critic: ModelConfig = field(default_factory=ModelConfig)  # path null: initialised from reward_model
    reward_funcs: list[str] = field(default_factory=list)  # rule rewards added to the reward model's score
    reward_weights: Optional[list[float]] = None  # one per reward (functions first, then the reward model)


@dataclass
class RLOOConfig:
    """RLOO (the reference RLOO trainer page): k samples per prompt, each baselined by the mean reward of the
    other k - 1; the KL to the reference folded into the sequence reward; a sequence-level PPO ratio."""

    rloo_k: int = 2  # samples per prompt
    kl_coef: float = 0.05
    cliprange: float = 0.2
    num_ppo_epochs: int = 4  # passes over each rollout batch
    num_mini_batches: int = 1  # optimizer steps per pass
    whiten_rewards: bool = False
    local_rollout_forward_batch_size: int = 64  # sequences per no-grad forward (reference, old log-probs, RM)
    response_length: int = 53  # max generated tokens
    # The k samples of a prompt trained as one row, [prompt | sample 1 | ... | sample k], so the prompt runs once
    # (no pipeline parallelism; see docs/algorithms/grpo.md). false: one row per sample.
    shared_prompt: bool = True
    temperature: float = 0.7
    missing_eos_penalty: Optional[float] = None  # subtracted from the score of a response without EOS
    stop_token: Optional[str] = None  # "eos": responses end at the first EOS even with generation.ignore_eos
    stop_token_id: Optional[int] = None  # a token id that ends responses too (not with stop_token)
    num_sample_generations: int = 10  # sample tables over the run
    reward_model: ModelConfig = field(default_factory=ModelConfig)  # a model with a value head (optional)
    reward_funcs: list[str] = field(default_factory=list)  # "module:function" or "file.py:function"
    reward_weights: Optional[list[float]] = None  # one per reward (functions first, then the reward model)


@dataclass
class GRPOConfig:
    """GRPO: a group of samples per prompt, advantages normalised within the group, a clipped token-level
    loss; the KL to the reference is a k3 loss term when ``beta`` > 0 (off by default)."""

    num_generations: int = 8  # samples per prompt (the group)
    epsilon: float = 0.2  # lower clip of the ratio
    epsilon_high: Optional[float] = None  # upper clip (DAPO's clip-higher); null: epsilon
    beta: float = 0.0  # weight of the k3 KL term; 0 loads no reference
    loss_type: str = choice("token_mean", "token_mean", "sequence_mean", "dr_grpo")
    scale_rewards: str = choice("group", "group", "batch", "none")  # divide advantages by this std
    num_iterations: int = 1  # passes over each rollout batch
    num_mini_batches: int = 1  # optimizer steps per pass
    max_completion_length: int = 256
    # The samples of a prompt trained as one row, [prompt | sample 1 | ... | sample G], so the prompt runs once
    # (loss_type token_mean, no pipeline parallelism; see docs/algorithms/grpo.md). false: one row per sample.
    shared_prompt: bool = True
    temperature: float = 1.0
    missing_eos_penalty: Optional[float] = None
    num_sample_generations: int = 10
    reward_model: ModelConfig = field(default_factory=ModelConfig)
    reward_funcs: list[str] = field(default_factory=list)
    reward_weights: Optional[list[float]] = None


@dataclass
class ReinforceConfig:
    """REINFORCE with a leave-one-out baseline (NeMo-Aligner's variant): the KL to the reference folded into
    the sequence reward, a PPO-style clipped sequence loss."""

    num_rollouts_per_prompt: int = 4
    initial_policy_kl_penalty: float = 0.01  # NeMo-Aligner's name for the KL coefficient
    cliprange: float = 0.2
    num_ppo_epochs: int = 1
    num_mini_batches: int = 1
    response_length: int = 128
    # The k samples of a prompt trained as one row, [prompt | sample 1 | ... | sample k], so the prompt runs once
    # (no pipeline parallelism; see docs/algorithms/grpo.md). false: one row per sample.
    shared_prompt: bool = True
    temperature: float = 1.0
    missing_eos_penalty: Optional[float] = None
    num_sample_generations: int = 10
    reward_model: ModelConfig = field(default_factory=ModelConfig)
    reward_funcs: list[str] = field(default_factory=list)
    reward_weights: Optional[list[float]] = None


@dataclass
class SelfRewardingConfig:
    """Self-rewarding (and meta-rewarding) DPO: the policy answers each prompt several times, judges its own
    answers with an LLM-as-judge template, and trains on best-vs-worst pairs; the reference becomes the
    current policy at the end of every iteration. Defaults follow the NeMo-Aligner pull request."""

    max_iterations: int = 3  # rounds of generate -> judge -> DPO; each is trainer.max_epochs over the prompts
    num_responses_to_gen: int = 4  # responses sampled per prompt (generation.* sets how)
    num_evals_to_average: int = 3  # judgements per response, averaged
    judge_template: Optional[str] = None  # Jinja file with {{ prompt }} and {{ response }}; null: the built-in rubric
    judge_score_regex: str = DEFAULT_SCORE_REGEX  # group 1 is the score; the last match in the judgement counts
    judge_score_low: float = 0.0  # scores outside [low, high] count as unparsed
    judge_score_high: float = 5.0
    judge_max_new_tokens: int = 128  # length cap of one judgement
    # Text the judge's reply starts with (put after the chat template opens the assistant turn, and parsed as part
    # of the judgement): "Score:" makes a small model give its number first.
    judge_prefill: str = ""
    length_control: Any = 0.0  # rho: a number, or one per iteration ([0, 0, 0.1]); 0 = off
    preference_loss: str = choice("dpo", "dpo", "ipo", "hinge")  # dpo is the sigmoid loss
    beta: float = 0.1  # KL strength to the reference (NeMo-Aligner's ref_policy_kl_penalty)
    label_smoothing: float = 0.0
    sft_loss_weight: float = 0.0  # weight of the NLL on the chosen response; 0 = plain DPO
    use_meta_judge: bool = False  # meta-rewarding: also train the judge on its own best-vs-worst judgements
    meta_judge_pcnt: float = 0.1  # at most this share of each global batch is meta-judge pairs; keep <= 0.15
    meta_judge_template: Optional[str] = None  # Jinja file; null: the built-in pairwise judgement comparison
    meta_judge_winner_regex: str = DEFAULT_WINNER_REGEX  # group 1 is A or B; the last match counts
    meta_judge_max_new_tokens: int = 128  # length cap of one meta-judgement
    meta_judge_prefill: str = ""  # the meta-judge's reply starts with this, e.g. "Winner: Judgement"


# The sections every job has, in the order the resolved config.yaml lists them.
COMMON_SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig),  # the policy (and, for DPO and PPO, the reference's initial weights)
    ("parallel", ParallelConfig),
    ("trainer", TrainerConfig),
    ("optim", OptimConfig),
    ("data", DataConfig),
    ("logger", LoggerConfig),
    ("plan", PlanConfig),
)


def job_schema(class_name: str, algorithm: str, section: type, generation: bool = False) -> type:
    """A top-level job dataclass: the common sections (plus ``generation`` for online algorithms) and the
    algorithm's own under its name."""
    sections = (*COMMON_SECTIONS, *((("generation", GenerationConfig),) if generation else ()), (algorithm, section))
    fields = [(key, tp, field(default_factory=tp)) for key, tp in sections]
    schema = make_dataclass(class_name, fields)
    schema.__module__ = __name__  # so it pickles and reads as aligner.config.jobs.<class_name>
    return schema


@dataclass
class GenerateJobConfig:
    """``aligner generate``: sample responses to ``data.prompts`` with the rollout engine and write them as
    JSON Lines. No training sections: the job only reads a model and writes one file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # data.prompts: the prompt records
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output: Optional[str] = None  # JSONL to write; null: <prompts file>.generations.jsonl beside the prompts


SFTJobConfig = job_schema("SFTJobConfig", "sft", SFTConfig)
DPOJobConfig = job_schema("DPOJobConfig", "dpo", DPOConfig)
RMJobConfig = job_schema("RMJobConfig", "rm", RMConfig)
KTOJobConfig = job_schema("KTOJobConfig", "kto", KTOConfig)
CPOJobConfig = job_schema("CPOJobConfig", "cpo", CPOConfig)
ORPOJobConfig = job_schema("ORPOJobConfig", "orpo", ORPOConfig)
SimPOJobConfig = job_schema("SimPOJobConfig", "simpo", SimPOConfig)
RLOOJobConfig = job_schema("RLOOJobConfig", "rloo", RLOOConfig, generation=True)
GRPOJobConfig = job_schema("GRPOJobConfig", "grpo", GRPOConfig, generation=True)
ReinforceJobConfig = job_schema("ReinforceJobConfig", "reinforce", ReinforceConfig, generation=True)
PPOJobConfig = job_schema("PPOJobConfig", "ppo", PPOConfig, generation=True)
SelfRewardingJobConfig = job_schema("SelfRewardingJobConfig", "self_rewarding", SelfRewardingConfig, generation=True)

# Algorithm name -> job schema. The name is also the schema's own section and the conf/<name>.yaml file.
JOB_SCHEMAS: dict[str, type] = {
    "sft": SFTJobConfig,
    "dpo": DPOJobConfig,
    "rm": RMJobConfig,
    "kto": KTOJobConfig,
    "cpo": CPOJobConfig,
    "orpo": ORPOJobConfig,
    "simpo": SimPOJobConfig,
    "rloo": RLOOJobConfig,
    "grpo": GRPOJobConfig,
    "reinforce": ReinforceJobConfig,
    "ppo": PPOJobConfig,
    "self_rewarding": SelfRewardingJobConfig,
    "generate": GenerateJobConfig,
}


def register_job_schemas() -> None:
    """Store every job schema in Hydra's ConfigStore as ``<algorithm>_schema`` (idempotent)."""
    store = ConfigStore.instance()
    for name, schema in JOB_SCHEMAS.items():
        store.store(name=f"{name}_schema", node=schema)


register_job_schemas()
