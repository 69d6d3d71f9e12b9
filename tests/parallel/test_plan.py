"""``aligner plan``: parameter counts per GPU, memory and FLOPs against hand computation, layout errors."""
from __future__ import annotations

import pytest

from aligner.config import load_config
from aligner.parallel.plan import GIB, plan_layout, plan_main

SMOLLM2_PARAMS = 134_515_008
LLAMA3_70B_PARAMS = 70_553_706_496


def _plan(name, *overrides):
    return plan_layout(load_config(name, list(overrides)), name)


def test_smollm2_single_gpu_holds_every_parameter():
    r = _plan("sft")
    assert not r.errors
    assert r.total_params == SMOLLM2_PARAMS
    assert r.stage_params_per_gpu == [SMOLLM2_PARAMS]  # tied embedding counted once


def test_smollm2_per_gpu_parameters_at_tp3_pp2_fsdp2():
    # 9 heads / 3 KV heads: tp 3 is SmolLM2's only tensor-parallel degree besides 1.
    r = _plan("sft", "parallel.tp=3", "parallel.pp=2", "parallel.gpus_per_node=12", "trainer.global_batch_size=8",
              "trainer.micro_batch_size=2")
    d, i, v = 576, 1536, 49152
    attn = d * d + 2 * d * 192 + d * d  # q, k, v (3 KV heads x 64), o
    layer = (attn + 3 * d * i) // 3 // 2 + 2 * d // 2  # sharded by tp 3 then FSDP 2; the 2 norms by FSDP only
    embed = v * d // 3 // 2  # vocab-parallel, then FSDP
    # 15 layers per stage; the tied embedding lives on the first stage and again as the LM head on the last.
    assert r.stage_params_per_gpu == [15 * layer + embed, 15 * layer + d // 2 + embed]
    assert r.stage_params_per_gpu == [13_574_592, 13_574_880]


def test_llama3_70b_per_gpu_parameters_at_tp8_pp4_fsdp2():
    r = _plan("examples/llama3_70b_dpo", "parallel.pp=4")
    assert r.total_params == LLAMA3_70B_PARAMS
    d, i, v = 8192, 28672, 128256
    attn = 2 * d * d + 2 * d * 1024  # q and o (64 heads x 128), k and v (8 KV heads x 128)
    layer = (attn + 3 * d * i) // 8 // 2 + 2 * d // 2
    embed = v * d // 8 // 2
    assert layer == 53_485_568
    assert r.stage_params_per_gpu == [20 * layer + embed, 20 * layer, 20 * layer, 20 * layer + d // 2 + embed]
    assert r.stage_params_per_gpu[0] == 1_135_378_432


def test_memory_of_a_single_gpu_fp32_layout_by_hand():
    r = _plan("sft")  # SmolLM2, fp32, 1 GPU, micro 1 x 1024 tokens, no checkpointing
    n, s, h, v, layers = SMOLLM2_PARAMS, 1024, 576, 49152, 30
    expect = {
        "parameters": 4 * n,
        "gradients": 4 * n,
        "optimizer": 8 * n,  # two fp32 moments
        "activations": layers * 34 * s * h * 2,  # Korthikanti's 34*s*b*h bf16 bytes, doubled for fp32
        "logits": s * v * (4 + 4),  # fp32 logits and the fp32 copy for the loss
    }
    expect["total"] = sum(expect.values())
    assert r.memory_gib.keys() == expect.keys()
    for key, value in expect.items():
        assert r.memory_gib[key] == pytest.approx(value / GIB, rel=1e-12), key


def test_memory_of_a_bf16_tp_pp_fsdp_dpo_layout_by_hand():
    r = _plan("dpo", "model=llama3_8b", "parallel.tp=2", "parallel.pp=2", "parallel.gpus_per_node=8",
              "parallel.mixed_precision=bfloat16", "parallel.activation_checkpointing=full",
              "trainer.max_seq_len=2048", "trainer.global_batch_size=16")
    assert r.dims.dp_shard == 2
    d, i, v, s, tp = 4096, 14336, 128256, 2048, 2
    layer = (2 * d * d + 2 * d * 1024 + 3 * d * i) // tp // 2 + 2 * d // 2
    head = v * d // tp // 2
    params = [16 * layer + head, 16 * layer + d // 2 + head]
    assert r.stage_params_per_gpu == params
    seqs = 2  # one pair: chosen + rejected
    kept = 2 * s * seqs * d / tp  # a checkpointed layer keeps its bf16 input, sequence-parallel over tp
    recompute = 34 * s * seqs * d / tp  # one layer's full activations while it is recomputed
    act = [2 * 16 * kept + recompute, 1 * 16 * kept + recompute]  # 1F1B: 2 micro-batches in flight on stage 0
    logits = seqs * s * v / tp * (2 + 4)
    fsdp = v * d / tp * (2 * 2 + 4)  # the largest unit is the embedding / LM head shard
    totals = [params[k] * (2 + 2 + 12) + act[k] + fsdp + params[k] * 2 + (logits if k == 1 else 0) for k in (0, 1)]
    assert r.stage_totals_gib == pytest.approx([t / GIB for t in totals], rel=1e-12)
    assert r.worst_stage == 1
    assert r.memory_gib["optimizer"] == pytest.approx(12 * params[1] / GIB, rel=1e-12)
    assert r.memory_gib["reference"] == pytest.approx(2 * params[1] / GIB, rel=1e-12)
    assert r.memory_gib["logits"] == pytest.approx(logits / GIB, rel=1e-12)


def test_step_flops_by_hand():
    r = _plan("sft")
    tokens = 8 * 1024
    assert r.tokens == tokens
    assert r.flops["policy training"] == (6 * SMOLLM2_PARAMS * tokens, 12 * 30 * 576 * 1024 * tokens)
    r = _plan("dpo", "model=llama3_8b", "trainer.max_seq_len=2048", "trainer.global_batch_size=16")
    n = 8_030_261_248 - 128256 * 4096  # the input embedding is a lookup, not a matmul
    tokens = 16 * 2 * 2048
    assert r.flops["policy training"][0] == 6 * n * tokens
    assert r.flops["reference forward"][0] == 2 * n * tokens
    assert r.step_flops == sum(a + b for a, b in r.flops.values())


@pytest.mark.parametrize("name", ["examples/llama3_70b_sft", "examples/llama3_70b_dpo", "examples/llama3_70b_ppo"])
def test_70b_examples_plan_and_fit_in_80_gib(name, capsys):
    assert plan_main([name]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "64 GPUs = 8 nodes x 8" in out
    r = _plan(name)
    assert r.fits and r.capacity_gib == 80.0
    assert 15 < r.total_gib < 80
    # AdamW state alone is 12 bytes x the policy's largest stage shard.
    assert r.memory_gib["optimizer"] == pytest.approx(12 * r.stage_params_per_gpu[r.worst_stage] / GIB)
    if name.endswith("ppo"):
        assert {"reference", "reward_model", "critic_optimizer"} <= r.memory_gib.keys()


def _fails(capsys, *argv):
    rc = plan_main(list(argv))
    err = capsys.readouterr().err
    assert rc == 1, err
    return err


def test_tp_that_does_not_divide_heads_lists_valid_tp(capsys):
    err = _fails(capsys, "examples/llama3_70b_dpo", "parallel.tp=7")
    assert "parallel.tp=7 does not divide model.arch.num_attention_heads=64" in err
    assert "valid parallel.tp values: 1, 2, 4, 8" in err
    err = _fails(capsys, "examples/llama3_70b_dpo", "parallel.tp=16", "parallel.pp=1")
    assert "parallel.tp=16 does not divide model.arch.num_key_value_heads=8" in err
    assert "model.arch.num_attention_heads" not in err


def test_vocab_not_divisible_by_tp(capsys):
    err = _fails(capsys, "sft", "model=tiny", "model.arch.vocab_size=130", "parallel.tp=4", "parallel.gpus_per_node=4",
                 "trainer.global_batch_size=1")
    assert "parallel.tp=4 does not divide model.arch.vocab_size=130" in err and "valid parallel.tp values: 1, 2" in err


def test_layers_not_divisible_by_pp_lists_valid_pp(capsys):
    err = _fails(capsys, "examples/llama3_70b_dpo", "parallel.pp=3")
    assert "parallel.pp=3 does not divide model.arch.num_hidden_layers=80" in err
    assert "valid parallel.pp values: 1, 2, 4, 8\n" in err  # 5, 10, ... divide 80 but not 64 / tp 8


def test_global_batch_not_divisible_says_which_values_work(capsys):
    err = _fails(capsys, "examples/llama3_70b_dpo", "trainer.global_batch_size=102")
    assert "trainer.global_batch_size=102 is not a multiple of" in err and "= 4" in err
    assert "trainer.global_batch_size=100 or 104" in err


def test_world_size_mismatch_names_the_keys(capsys):
    err = _fails(capsys, "examples/llama3_70b_dpo", "parallel.dp_shard=3")
    assert "parallel.dp_shard" in err and "parallel.dp_shard=4 or -1" in err
    assert "world size = parallel.nodes 8 x parallel.gpus_per_node 8 = 64" in err


def test_over_memory_warns_and_fails_with_strict(capsys):
    assert plan_main(["examples/llama3_70b_dpo", "plan.gpu_memory_gib=20"]) == 0
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "warning: stage 0 needs" in captured.err
    assert plan_main(["examples/llama3_70b_dpo", "plan.gpu_memory_gib=20", "--strict"]) == 1
    assert "error: stage 0 needs" in capsys.readouterr().err


def test_config_errors_exit_non_zero(capsys):
    err = _fails(capsys, "examples/llama3_70b_dpo", "parallel.tpp=8")
    assert "did you mean 'parallel.tp'" in err


def test_selective_checkpointing_and_pipeline_schedules_by_hand():
    s, h = 1024, 576
    full, kept = 34 * s * h * 2, 2 * s * h * 2  # fp32: twice the bf16 bytes of the formula
    r = _plan("sft", "parallel.activation_checkpointing=selective")
    # Layers 0, 2, ..., 28 are checkpointed (every 2nd, by global index), 1, 3, ..., 29 keep everything;
    # one checkpointed layer is recomputed at a time.
    assert r.memory_gib["activations"] == pytest.approx((15 * kept + 15 * full + full) / GIB, rel=1e-12)
    base = ["parallel.pp=2", "parallel.gpus_per_node=2", "trainer.global_batch_size=8"]  # 8 micro-batches
    one_f_one_b = _plan("sft", *base).stage_totals_gib
    gpipe = _plan("sft", *base, "parallel.pp_schedule=GPipe").stage_totals_gib
    # Stage 0 holds 2 micro-batches of 15 layers under 1F1B and all 8 under GPipe.
    assert gpipe[0] - one_f_one_b[0] == pytest.approx((8 - 2) * 15 * full / GIB, rel=1e-9)


def test_ppo_counts_four_models_and_their_flops():
    r = _plan("ppo")  # reward model and critic default to the policy's architecture
    assert any("ppo.reward_model: no path or arch" in n for n in r.notes)
    n = SMOLLM2_PARAMS
    critic = n + 576 + 1  # the value head Linear(576, 1) replaces the (tied) LM head; the embedding stays
    critic_matmul = critic - 49152 * 576  # without the embedding lookup
    assert r.memory_gib["reference"] == r.memory_gib["parameters"] == pytest.approx(4 * n / GIB)
    assert r.memory_gib["reward_model"] == pytest.approx(4 * critic / GIB)
    assert r.memory_gib["critic_optimizer"] == pytest.approx(8 * critic / GIB)
    assert "critic_logits" not in r.memory_gib  # a scalar head has no [B, T, V] logits
    tokens = 8 * 1024
    assert r.flops["policy training x4 epochs"][0] == 4 * 6 * n * tokens
    assert r.flops["critic training x4 epochs"][0] == 4 * 6 * critic_matmul * tokens
    assert r.flops["reward model forward"][0] == 2 * critic_matmul * tokens
