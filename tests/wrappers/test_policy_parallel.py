"""PolicyModel at dp_shard=2, dp_replicate=2, TP=2, PP=2 (1F1B, tied embeddings) and PP=2 interleaved equals one process.

Two training steps on the same global batches (4 rows of different lengths, padded): the same
loss, metrics, gradient norm (clipping is active) and weights after the steps within 1e-5; the
metrics are identical on every rank; the state-dict keys are those of one process; a model loaded
from the state dict continues bit-for-bit, and a DCP checkpoint of the TP=2 and PP=2 runs loads into
one process and continues like the single-process run.
"""
import json
from pathlib import Path

import pytest
import torch
from helpers import run_torchrun
import torch.distributed.checkpoint as dcp
from policy_common import (
    TOTAL_STEPS, TokenLoss, evaluate, full_weights, job_config, make_batch, run_steps, state_dict_keys)

from aligner.wrappers import PolicyModel

WORKER = Path(__file__).parent / "workers" / "policy_layouts.py"
CASES = {
    "dp2": {"layout": {"dp_shard": 2}},
    "tp2": {"layout": {"tp": 2, "dp_shard": 1}},
    # Without sequence parallelism the norm weights stay plain (replicated) tensors beside the DTensors.
    "tp2_no_sp_mbs2": {"layout": {"tp": 2, "dp_shard": 1, "sequence_parallel": False}, "micro_batch_size": 2},
    # Replicas accumulate 2 micro-batches locally, then reduce once.
    "replicate2": {"layout": {"dp_replicate": 2, "dp_shard": 1}},
    "pp2_tied": {"layout": {"pp": 2, "dp_shard": 1}, "tied": True},
    "pp2_interleaved_mbs2": {"layout": {"pp": 2, "dp_shard": 1, "pp_schedule": "Interleaved1F1B"},
                             "micro_batch_size": 2},
}


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_layouts")
    (out / "cases.json").write_text(json.dumps(CASES))
    run_torchrun(WORKER, 2, str(out), str(out / "cases.json"))
    results = {}
    for name in CASES:
        ranks = [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)]
        weights = {}
        for r in ranks:
            weights.update(r["weights"])
        results[name] = dict(ranks=ranks, weights=weights, checkpoint=out / f"{name}.dcp")
    return results


@pytest.fixture(scope="module")
def references(single_process_mesh):
    refs = {}
    for tied in (False, True):
        policy = PolicyModel(job_config(tied=tied), single_process_mesh)
        metrics = run_steps(policy, steps=2)
        refs[tied] = dict(metrics=metrics, weights=full_weights(policy), keys=state_dict_keys(policy),
                          evaluated=evaluate(policy), third_step=policy.train_step(make_batch(2), TokenLoss()))
    return refs


@pytest.mark.parametrize("name", list(CASES))
def test_metrics_match_one_process(parallel_results, references, name):
    ref = references[CASES[name].get("tied", False)]["metrics"]
    got = parallel_results[name]["ranks"][0]["metrics"]
    for step, (r, g) in enumerate(zip(ref, got)):
        assert set(g) == {"loss", "nll", "rows", "grad_norm", "lr"}
        for key in r:
            assert g[key] == pytest.approx(r[key], rel=1e-5, abs=1e-6), (name, step, key)
        assert r["grad_norm"] > 1.0  # clipping was active


@pytest.mark.parametrize("name", list(CASES))
def test_metrics_identical_on_every_rank(parallel_results, name):
    everyone = parallel_results[name]["ranks"][0]["all_ranks_metrics"]
    assert all(m == everyone[0] for m in everyone)


@pytest.mark.parametrize("name", list(CASES))
def test_weights_match_one_process(parallel_results, references, name):
    tied = CASES[name].get("tied", False)
    ref = references[tied]["weights"]
    got = parallel_results[name]["weights"]
    expected_names = set(ref) | ({"output.weight"} if tied and "pp2" in name else set())
    assert set(got) == expected_names
    for key, value in got.items():
        # Under PP the last stage's LM head is its own copy of the tied embedding; it must stay equal.
        target = ref["tok_embeddings.weight"] if tied and key == "output.weight" else ref[key]
        torch.testing.assert_close(value, target, rtol=0, atol=1e-5, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", ["tp2", "dp2"])
def test_state_dict_keys_match_one_process(parallel_results, references, name):
    ref = references[False]["keys"]
    got = parallel_results[name]["ranks"][0]["keys"]
    assert got == ref
    assert "layers.0.self_attn.q_proj.weight" in got["model"]
    assert "state.layers.0.self_attn.q_proj.weight.exp_avg" in got["optimizer"]


def test_pipeline_ranks_hold_disjoint_keys_covering_the_model(parallel_results, references):
    ref = references[False]["keys"]
    ranks = parallel_results["pp2_interleaved_mbs2"]["ranks"]
    model_keys = [set(r["keys"]["model"]) for r in ranks]
    assert not model_keys[0] & model_keys[1]
    assert model_keys[0] | model_keys[1] == set(ref["model"])
    # Interleaved: rank 0 holds stages 0 and 2 (layers 0 and 2), one optimizer and one state dict over both.
    assert {k for k in model_keys[0] if k.startswith("layers.")} == {
        k for k in ref["model"] if k.startswith(("layers.0.", "layers.2."))}
    assert set(ranks[0]["keys"]["optimizer"]) | set(ranks[1]["keys"]["optimizer"]) == set(ref["optimizer"])


def test_tied_pipeline_keys_match_one_process(parallel_results, references):
    """The last stage's tied head saves its weight as output.weight (as one process does) and its optimizer
    state under the embedding's name (one process has no separate state for it)."""
    ref = references[True]["keys"]
    ranks = parallel_results["pp2_tied"]["ranks"]
    assert set(ranks[0]["keys"]["model"]) | set(ranks[1]["keys"]["model"]) == set(ref["model"])
    assert "output.weight" in ranks[1]["keys"]["model"]
    assert set(ranks[0]["keys"]["optimizer"]) | set(ranks[1]["keys"]["optimizer"]) == set(ref["optimizer"])
    assert "state.tok_embeddings.weight.exp_avg" in ranks[1]["keys"]["optimizer"]


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_continues_bit_for_bit(parallel_results, name):
    for rank in parallel_results[name]["ranks"]:
        assert rank["resumed_third_step"] == rank["third_step"]
        assert rank["resumed_weights_equal"]


@pytest.mark.parametrize("name", ["tp2", "pp2_tied", "dp2"])
def test_checkpoint_loads_at_one_process(parallel_results, references, single_process_mesh, name):
    tied = CASES[name].get("tied", False)
    policy = PolicyModel(job_config(tied=tied), single_process_mesh)
    policy.set_total_steps(TOTAL_STEPS)
    state = policy.state_dict()
    dcp.load(state, checkpoint_id=parallel_results[name]["checkpoint"])
    policy.load_state_dict(state)
    saved = parallel_results[name]["weights"]
    for key, value in full_weights(policy).items():
        assert torch.equal(value, saved[key]), key
    third = policy.train_step(make_batch(2), TokenLoss())
    assert third == pytest.approx(references[tied]["third_step"], rel=1e-5)
    assert third == pytest.approx(parallel_results[name]["ranks"][0]["third_step"], rel=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_eval_step_and_forward_match_one_process(parallel_results, references, name):
    ref = references[CASES[name].get("tied", False)]["evaluated"]
    ranks = parallel_results[name]["ranks"]
    assert ranks[0]["eval"] == pytest.approx(ref["eval"], rel=1e-5)
    assert all(r["eval"] == ranks[0]["eval"] for r in ranks)
    for r in ranks:  # each data-parallel rank's log-probs are the rows of its share
        n = ref["logprobs"].shape[0] // r["dp_size"]
        want = ref["logprobs"][r["dp_rank"] * n:(r["dp_rank"] + 1) * n]
        torch.testing.assert_close(r["logprobs"], want, rtol=0, atol=1e-5)
