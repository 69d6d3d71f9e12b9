"""FSDP2 data parallelism (FSDP, HSDP, replication, with and without TP) equals one process.

Each dp rank gets a different part of the batch; loss, every gathered gradient, every weight after
one AdamW step and the loss after it equal a single process on the whole batch within 1e-5.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

_spec = importlib.util.spec_from_file_location("tp_fsdp_train_step", Path(__file__).parent / "workers" / "tp_fsdp_train_step.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

CASES_1 = {
    # One process: no collectives at all, and the tie of a plain (not DTensor) parameter after to_empty.
    "single_tied": {"layout": {}, "model": {"tie_word_embeddings": True}},
}
CASES_2 = {
    "fsdp": {"layout": {"dp_shard": 2}},
    "fsdp_tied_padded": {"layout": {"dp_shard": 2}, "model": {"tie_word_embeddings": True}, "padded": True},
    "replicate": {"layout": {"dp_replicate": 2, "dp_shard": 1}},
}
CASES_4 = {
    "tp2_fsdp2": {"layout": {"tp": 2, "dp_shard": 2}},
    "tp2_fsdp2_qwen3_tied_ac": {"layout": {"tp": 2, "dp_shard": 2},
                                "model": {"qk_norm": True, "tie_word_embeddings": True, "model_type": "qwen3"},
                                "options": {"activation_checkpointing": "full"}},
    "hsdp_padded_ac_selective": {"layout": {"dp_replicate": 2, "dp_shard": 2}, "padded": True,
                                 "options": {"activation_checkpointing": "selective", "ac_every_n": 2}},
    "tp2_fsdp2_stages": {"layout": {"tp": 2, "dp_shard": 2}, "stages": [[0, 1], [2, 3]]},
    "tp2_replicate2_qwen2": {"layout": {"tp": 2, "dp_replicate": 2, "dp_shard": 1},
                             "model": {"attention_bias": True, "model_type": "qwen2"}},
}
MIXED = {
    # bf16 compute over float32 master weights, gradients reduced in float32; with and without dp.
    "fsdp_bf16": {"layout": {"dp_shard": 2}, "options": {"mixed_precision": "bfloat16"}},
    "tp2_bf16": {"layout": {"tp": 2}, "options": {"mixed_precision": "bfloat16"}},
}


@pytest.fixture(scope="module")
def results_1(tmp_path_factory):
    return harness.run_cases(tmp_path_factory.mktemp("dp1"), 1, CASES_1)


@pytest.fixture(scope="module")
def results_2(tmp_path_factory):
    return harness.run_cases(tmp_path_factory.mktemp("dp2"), 2, {**CASES_2, **MIXED})


@pytest.fixture(scope="module")
def results_4(tmp_path_factory):
    return harness.run_cases(tmp_path_factory.mktemp("dp4"), 4, CASES_4)


@pytest.mark.parametrize("name", list(CASES_1))
def test_single_process_build(results_1, name):
    harness.assert_matches_reference(results_1[name], CASES_1[name])
    assert results_1[name]["tied_after_build"]


@pytest.mark.parametrize("name", list(CASES_2))
def test_two_processes_equal_single_process(results_2, name):
    harness.assert_matches_reference(results_2[name], CASES_2[name])


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_processes_equal_single_process(results_4, name):
    harness.assert_matches_reference(results_4[name], CASES_4[name])


def test_fsdp_shards_parameters(results_2, results_4):
    cfg = tiny_config()
    up = "layers.0.mlp.up_proj.weight"
    assert results_2["fsdp"]["local_shapes"][up] == (cfg.intermediate_size // 2, cfg.hidden_size)
    assert results_2["replicate"]["local_shapes"][up] == (cfg.intermediate_size, cfg.hidden_size)
    assert results_4["hsdp_padded_ac_selective"]["local_shapes"][up] == (cfg.intermediate_size // 2, cfg.hidden_size)
    # TP then FSDP over the same dim: each of the 4 ranks holds a quarter of the rows.
    assert results_4["tp2_fsdp2"]["local_shapes"][up] == (cfg.intermediate_size // 4, cfg.hidden_size)
    assert results_4["tp2_fsdp2_qwen3_tied_ac"]["tied_after_build"]
    assert results_2["fsdp_tied_padded"]["tied_after_build"]


@pytest.mark.parametrize("name", list(MIXED))
def test_bf16_mixed_precision(results_2, name):
    got = results_2[name]
    want = harness.reference_step(MIXED[name], got["batch"])
    assert set(got["param_dtypes"].values()) == {"torch.float32"}  # master weights stay float32
    assert abs(got["loss"] - want["loss"]) < 2e-2  # bf16 compute, ~3 significant digits
    for n, g in want["grads"].items():
        err = (got["grads"][n] - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 5e-2, (n, err.item())
    # Adam moves every weight by at most ~lr = 1e-3 on its first step, whatever the gradient's rounding.
    for n, w in want["weights"].items():
        assert (got["weights"][n] - w).abs().max() <= 2.1e-3, n
    # bf16 compute gives a different loss than float32: the policy is really in effect.
    assert got["loss"] != pytest.approx(want["loss"], abs=1e-6)
