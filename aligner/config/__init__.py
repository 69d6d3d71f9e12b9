"""Typed job configs: dataclass schemas, Hydra composition of ``conf/`` YAML, clear errors.

    cfg = load_config("examples/llama3_70b_dpo", ["parallel.pp=2", "dpo.beta=0.05"])
    cfg.dpo.beta, cfg.parallel.tp, cfg.trainer.global_batch_size
    save_resolved_config(cfg, "outputs/run/config.yaml")
"""
from aligner.config.architecture import arch_to_hf_dict, architecture_dict
from aligner.config.errors import ConfigError
from aligner.config.jobs import (
    JOB_SCHEMAS,
    REFERENCE_MODES,
    CPOConfig,
    KTOConfig,
    ORPOConfig,
    RMConfig,
    SimPOConfig,
    DPOConfig,
    DPOJobConfig,
    GenerateJobConfig,
    PPOConfig,
    PPOJobConfig,
    SFTConfig,
    SFTJobConfig,
    job_schema,
    register_job_schemas,
)
from aligner.config.load import available_configs, conf_dir, config_to_yaml, load_config, save_resolved_config
from aligner.config.schema import (
    ArchConfig,
    DataConfig,
    GenerationConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PlanConfig,
    SchedulerConfig,
    TrainerConfig,
    TrtLlmConfig,
    WandbConfig,
)

__all__ = [
    "JOB_SCHEMAS", "REFERENCE_MODES", "CPOConfig", "KTOConfig", "ORPOConfig", "RMConfig", "SimPOConfig", "ArchConfig", "ConfigError", "DPOConfig", "DPOJobConfig", "DataConfig", "GenerateJobConfig",
    "GenerationConfig", "LoggerConfig", "ModelConfig", "OptimConfig", "PPOConfig", "PPOJobConfig", "ParallelConfig",
    "PlanConfig", "SFTConfig", "SFTJobConfig", "SchedulerConfig", "TrainerConfig", "TrtLlmConfig", "WandbConfig",
    "arch_to_hf_dict", "architecture_dict", "available_configs", "conf_dir", "config_to_yaml", "job_schema",
    "load_config", "register_job_schemas", "save_resolved_config",
]
