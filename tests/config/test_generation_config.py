"""The generation section: its sampling defaults are SamplingParams's, overrides reach the engines' settings,
the generate job's schema, and the negative-KL warning for training configs."""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import pytest

from aligner.config import JOB_SCHEMAS, GenerateJobConfig, GenerationConfig, load_config
from aligner.generation.engine import SamplingParams, warn_if_distribution_changed
from helpers import REPO


def test_sampling_defaults_are_sampling_params_defaults():
    config, params = GenerationConfig(), SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        if f.name == "prompt_index_offset":  # set per call by trainers, not a config key
            continue
        assert getattr(config, f.name) == getattr(params, f.name), f.name
    assert config.sampling_params() == params
    assert (params.temperature, params.top_k, params.top_p, params.min_new_tokens) == (1.0, 0, 1.0, 0)  # pure
    a, b = GenerationConfig(), GenerationConfig()
    a.stop_token_ids.append(7)
    assert b.stop_token_ids == [] and SamplingParams().stop_token_ids == []  # lists are not shared


def test_generate_job_overrides_reach_the_sampling_params():
    cfg = load_config("generate", ["data.prompts=p.jsonl", "generation.temperature=0", "generation.n=4",
                                   "generation.stop_strings=[\"###\",END]", "generation.seed=3", "output=o.jsonl"])
    assert isinstance(cfg, GenerateJobConfig) and JOB_SCHEMAS["generate"] is GenerateJobConfig
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.output == "o.jsonl" and cfg.data.prompts == "p.jsonl"
    sampling = cfg.generation.sampling_params()
    assert (sampling.greedy, sampling.n, sampling.stop_strings, sampling.seed) == (True, 4, ["###", "END"], 3)
    assert load_config("generate").generation == GenerationConfig()  # conf/generate.yaml changes no generation key
    bad = load_config("generate", ["generation.top_p=0"]).generation
    with pytest.raises(ValueError, match=r"generation: top_p=0.0 must be in \(0, 1\]"):
        bad.sampling_params()


def test_warning_explains_negative_kl_for_distribution_changes(caplog, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.WARNING, logger="aligner.generation"):
        assert warn_if_distribution_changed(GenerationConfig(), "ppo") is False
        assert not caplog.records
        assert warn_if_distribution_changed(SamplingParams(top_k=50, top_p=0.9, max_new_tokens=8), "ppo") is True
    (record,) = caplog.records
    assert "top_k=50, top_p=0.9" in record.message and "negative" in record.message and "ppo" in record.message
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # only rank 0 says it, every rank gets the answer
    with caplog.at_level(logging.WARNING, logger="aligner.generation"):
        assert warn_if_distribution_changed(SamplingParams(min_new_tokens=4, max_new_tokens=8), "grpo") is True
    assert not caplog.records


def test_config_imports_without_an_import_cycle_or_tensorrt_llm():
    code = ("import aligner.config, aligner.generation.trtllm_engine, aligner.generation.cli, sys; "
            "assert 'tensorrt_llm' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
