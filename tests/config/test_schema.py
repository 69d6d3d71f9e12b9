"""The typed config schema: defaults from the schema only, overrides, and errors that name key and source."""
from __future__ import annotations

import dataclasses
import json

import pytest
from omegaconf import OmegaConf

from aligner.config import (
    JOB_SCHEMAS,
    ArchConfig,
    ConfigError,
    DPOConfig,
    DPOJobConfig,
    GenerateJobConfig,
    LoggerConfig,
    ParallelConfig,
    PPOJobConfig,
    SFTJobConfig,
    TrainerConfig,
    architecture_dict,
    conf_dir,
    load_config,
    save_resolved_config,
)
from aligner.config.schema import ModelConfig
from aligner.models import TransformerConfig, config_from_hf


def test_defaults_come_from_the_schema():
    cfg = load_config("dpo")
    assert isinstance(cfg, DPOJobConfig)
    assert cfg.dpo == DPOConfig()
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing, cfg.dpo.rpo_alpha) == (0.1, "sigmoid", 0.0, 1.0)
    assert cfg.parallel == ParallelConfig() and cfg.logger == LoggerConfig()
    # conf/dpo.yaml sizes the run for SmolLM2 on the shipped set; everything else is the schema's.
    changed = {"output_dir", "max_seq_len", "val_check_interval"}
    assert {k: v for k, v in vars(cfg.trainer).items() if k not in changed} == {
        k: v for k, v in vars(TrainerConfig()).items() if k not in changed}
    assert cfg.trainer.max_steps == -1 and cfg.trainer.resume == "auto" and cfg.parallel.dp_shard == -1
    assert cfg.optim.lr == 5e-6 and cfg.data.train == "examples/data/preference_train.jsonl"
    assert cfg.model.arch.hidden_size == 576  # the default model group: smollm2_135m


def test_ppo_defaults_are_the_reference_values():
    ppo = load_config("ppo").ppo
    assert (ppo.kl_coef, ppo.cliprange, ppo.vf_coef, ppo.cliprange_value, ppo.gamma, ppo.lam) == (
        0.05, 0.2, 0.1, 0.2, 1.0, 0.95)
    assert (ppo.whiten_rewards, ppo.num_ppo_epochs, ppo.num_mini_batches, ppo.local_rollout_forward_batch_size,
            ppo.response_length, ppo.temperature, ppo.num_sample_generations) == (False, 4, 1, 64, 53, 0.7, 10)
    assert ppo.missing_eos_penalty is None and ppo.stop_token is None
    assert ppo.reward_model == ModelConfig() and ppo.critic == ModelConfig()


def _raw_leaves(node, prefix=""):
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            yield from _raw_leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", ["sft", "dpo", "ppo", "rm", "kto", "cpo", "orpo", "simpo", "grpo", "rloo", "reinforce",
                                  "examples/llama3_70b_sft",
                                  "examples/llama3_70b_dpo", "examples/llama3_70b_ppo"])
def test_yaml_files_hold_only_what_differs_from_the_schema(name):
    schema = JOB_SCHEMAS[name.split("_")[-1].split("/")[-1]]
    defaults = OmegaConf.structured(schema)
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir() / f"{name}.yaml"))
    leaves = dict(_raw_leaves(raw))
    assert leaves, name
    for key, value in leaves.items():
        assert OmegaConf.select(defaults, key) != value, f"{name}.yaml repeats the schema default of {key}"


def test_override_wins_and_group_switch():
    cfg = load_config("dpo", ["dpo.beta=0.25", "parallel.tp=2", "model=tiny", "optim.betas=[0.9,0.95]"])
    assert cfg.dpo.beta == 0.25 and cfg.parallel.tp == 2 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.model.arch.hidden_size == 64 and cfg.model.arch.num_hidden_layers == 4


def test_example_composes_base_and_model_size():
    cfg = load_config("examples/llama3_70b_dpo", ["parallel.pp=4"])
    assert isinstance(cfg, DPOJobConfig)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.nodes * cfg.parallel.gpus_per_node) == (8, 4, 64)
    assert cfg.optim.lr == 5e-7  # the example's own, not conf/dpo.yaml's SmolLM2 value
    assert cfg.model.arch.num_hidden_layers == 80 and cfg.model.arch.rope_scaling["factor"] == 8.0
    ppo = load_config("examples/llama3_70b_ppo")
    assert ppo.ppo.reward_model.arch.hidden_size == 8192 and ppo.ppo.critic.arch is None


def test_unknown_key_on_the_command_line_names_key_and_nearest():
    with pytest.raises(ConfigError) as e:
        load_config("dpo", ["dpo.betaa=0.2"])
    msg = str(e.value)
    assert "'dpo.betaa'" in msg and "did you mean 'dpo.beta'" in msg and "override 'dpo.betaa=0.2'" in msg
    with pytest.raises(ConfigError, match=r"'trainer.micro_batch'.*did you mean 'trainer.micro_batch_size'"):
        load_config("sft", ["trainer.micro_batch=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'foo'.*valid keys"):
        load_config("sft", ["+foo=1"])  # Hydra's append syntax cannot add keys either


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("defaults:\n  - /dpo\n  - _self_\ndpo:\n  betta: 0.3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert "mine.yaml" in msg and "'dpo.betta'" in msg and "did you mean 'dpo.beta'" in msg
    path.write_text("defaults:\n  - /sft\n  - _self_\nmodel:\n  arch:\n    hiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"mine.yaml.*'model.arch.hiden_size'.*'model.arch.hidden_size'"):
        load_config(str(path))


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'trainer.max_steps=abc'.*'trainer.max_steps' expects an integer"):
        load_config("sft", ["trainer.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"'dpo.beta' expects a number, got 'high'"):
        load_config("dpo", ["dpo.beta=high"])
    path = tmp_path / "typed.yaml"
    path.write_text("defaults:\n  - /sft\n  - _self_\nparallel:\n  sequence_parallel: sometimes\n")
    with pytest.raises(ConfigError, match=r"typed.yaml.*'parallel.sequence_parallel' expects true or false"):
        load_config(str(path))


def test_choice_and_group_errors_list_the_valid_values():
    with pytest.raises(ConfigError, match=r"'parallel.pp_schedule' is '1f1b'.*1F1B, GPipe, Interleaved1F1B.*'1F1B'"):
        load_config("dpo", ["parallel.pp_schedule=1f1b"])
    with pytest.raises(ConfigError, match=r"'logger.wandb.mode'.*disabled, offline, online"):
        load_config("sft", ["logger.wandb.mode=cloud"])
    with pytest.raises(ConfigError, match=r"override 'model=llama3_7b'.*did you mean 'llama3_70b'.*llama3_8b"):
        load_config("sft", ["model=llama3_7b"])
    with pytest.raises(ConfigError, match=r"no config 'dpoo'.*did you mean 'dpo'"):
        load_config("dpoo")


def test_missing_architecture_size_is_named(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("defaults:\n  - sft_schema\n  - _self_\nmodel:\n  arch:\n    hidden_size: 64\n")
    with pytest.raises(ConfigError, match=r"'model.arch.vocab_size' is required"):
        load_config(str(path))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("examples/llama3_70b_ppo", ["ppo.kl_coef=0.02", "trainer.seed=7"])
    path = save_resolved_config(cfg, tmp_path / "run" / "config.yaml")
    text = path.read_text()
    assert "kl_coef: 0.02" in text and "defaults" not in text and "save_top_k" in text
    again = load_config(str(path))  # no schema line: typed by its `ppo:` section
    assert isinstance(again, PPOJobConfig) and again == cfg
    assert load_config(str(path), ["trainer.seed=8"]).trainer.seed == 8


def test_arch_schema_mirrors_transformer_config():
    ours = {f.name for f in dataclasses.fields(ArchConfig)}
    theirs = {f.name for f in dataclasses.fields(TransformerConfig)} - {"extra"}
    assert ours == theirs


# Published parameter counts (embeddings counted once when tied).
MODEL_SIZES = {
    "smollm2_135m": 134_515_008,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "qwen2_5_7b": 7_615_616_512,
    "qwen2_5_72b": 72_706_203_648,
    "tiny": 164_416,
}


@pytest.mark.parametrize("name,params", sorted(MODEL_SIZES.items()))
def test_model_sizes_have_the_published_parameter_counts(name, params):
    cfg = load_config("sft", [f"model={name}"])
    arch = config_from_hf(architecture_dict(cfg.model))
    assert arch.num_params == params
    if name.startswith("llama3"):
        assert arch.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if name.startswith("qwen"):
        assert arch.attention_bias and arch.rms_norm_eps == 1e-6 and arch.rope_theta == 1e6


def test_checkpoint_config_json_wins_and_must_agree_with_arch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
                                                      "intermediate_size": 128, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "num_key_value_heads": 2}))
    model = ModelConfig(path=str(tmp_path))
    assert architecture_dict(model)["num_hidden_layers"] == 2
    model.arch = ArchConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4)
    with pytest.raises(ValueError, match=r"model.arch.num_hidden_layers=4 disagrees with num_hidden_layers=2"):
        architecture_dict(model)
    with pytest.raises(ValueError, match=r"model has neither a path nor an arch"):
        architecture_dict(ModelConfig())


def test_documented_defaults_match_the_schema():
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    schemas = [OmegaConf.structured(s) for s in (SFTJobConfig, DPOJobConfig, PPOJobConfig, GenerateJobConfig)]
    rows = [line.split("|")[1:3] for line in docs.read_text().splitlines() if line.startswith("| `")]
    checked = 0
    for key_cell, default_cell in rows:
        if not default_cell.strip().startswith("`"):
            continue  # the overrides table
        key, text = key_cell.strip().strip("`"), default_cell.strip().strip("`")
        try:
            documented = json.loads(text)
        except json.JSONDecodeError:
            documented = text
        schema = next(s for s in schemas if key.split(".")[0] in s)  # the job that has this section
        actual = OmegaConf.select(schema, key)
        actual = OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual
        assert documented == actual, f"docs/configuration.md says {key} = {text}, the schema says {actual}"
        checked += 1
    assert checked > 60
