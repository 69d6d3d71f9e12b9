"""Tensor parallel (TP=2, 2 gloo processes) equals one process: loss, gradients, weights after AdamW."""
import importlib.util
from pathlib import Path

import pytest
from helpers import tiny_config

from aligner.parallel.tensor_parallel import check_tensor_parallel_divisibility

_spec = importlib.util.spec_from_file_location("tp_fsdp_train_step", Path(__file__).parent / "workers" / "tp_fsdp_train_step.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

TP = {"tp": 2}
CASES = {
    "llama": {"layout": TP},
    # Qwen3-style q/k norm with tied embeddings: the norm weight's gradient is summed over heads held
    # by different ranks, and the tied [V, D] matrix is Shard(0) both as embedding and as head.
    "qwen3_tied": {"layout": TP, "model": {"qk_norm": True, "tie_word_embeddings": True, "model_type": "qwen3"}},
    # Qwen2 qkv bias, without sequence parallelism and with gathered (plain) logits.
    "qwen2_no_sp": {"layout": TP, "model": {"attention_bias": True, "model_type": "qwen2"},
                    "options": {"sequence_parallel": False, "loss_parallel": False}},
    "padded": {"layout": TP, "padded": True},
    "odd_length": {"layout": TP, "seq": 7},  # uneven sequence shards (4 + 3 tokens) under SP
    "value_head": {"layout": TP, "value_head": True, "padded": True},
    # Pipeline-stage models (no embedding / no head, some layers) chained by hand: what the pipeline
    # code builds per stage. Under SP a boundary carries the plain local sequence shard.
    "stages_sp": {"layout": TP, "stages": [[0, 1], [2, 3]], "padded": True},
    "stages_no_sp": {"layout": TP, "stages": [[0], [1, 2], [3]], "options": {"sequence_parallel": False}},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return harness.run_cases(tmp_path_factory.mktemp("tp2"), 2, CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_equals_single_process(results, name):
    harness.assert_matches_reference(results[name], CASES[name])


def test_tp2_shards_every_matrix(results):
    shapes = results["llama"]["local_shapes"]
    cfg = tiny_config()
    hd = cfg.head_dim
    assert shapes["tok_embeddings.weight"] == (cfg.vocab_size // 2, cfg.hidden_size)  # rowwise over vocab
    assert shapes["output.weight"] == (cfg.vocab_size // 2, cfg.hidden_size)  # colwise over vocab
    assert shapes["layers.0.self_attn.q_proj.weight"] == (cfg.num_attention_heads * hd // 2, cfg.hidden_size)
    assert shapes["layers.0.self_attn.k_proj.weight"] == (cfg.num_key_value_heads * hd // 2, cfg.hidden_size)
    assert shapes["layers.0.self_attn.o_proj.weight"] == (cfg.hidden_size, cfg.num_attention_heads * hd // 2)
    assert shapes["layers.0.mlp.up_proj.weight"] == (cfg.intermediate_size // 2, cfg.hidden_size)
    assert shapes["layers.0.mlp.down_proj.weight"] == (cfg.hidden_size, cfg.intermediate_size // 2)
    assert shapes["norm.weight"] == (cfg.hidden_size,)  # replicated
    bias = results["qwen2_no_sp"]["local_shapes"]["layers.0.self_attn.q_proj.bias"]
    assert bias == (cfg.num_attention_heads * hd // 2,)
    assert results["value_head"]["local_shapes"]["output.weight"] == (1, cfg.hidden_size)  # not sharded


def test_tied_embedding_stays_tied(results):
    assert results["qwen3_tied"]["tied_after_build"]
    assert "output.weight" not in results["qwen3_tied"]["grads"]  # one parameter, named once


def test_divisibility_error_names_the_key_and_numbers():
    with pytest.raises(ValueError) as err:
        check_tensor_parallel_divisibility(tiny_config(num_key_value_heads=2, vocab_size=130), 4)
    msg = str(err.value)
    assert "parallel.tp=4" in msg and "num_key_value_heads=2" in msg and "vocab_size=130" in msg
    assert "num_attention_heads" not in msg  # 4 heads divide by 4
    assert "Valid parallel.tp values: [1, 2]" in msg
