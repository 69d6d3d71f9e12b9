"""The built-in engine at TP=2, dp_shard=2 (FSDP), dp_replicate=2 and PP=2 (2 gloo processes), and at TP x FSDP
and PP x TP (4 processes), generates what one process does.

Every case runs PolicyModel.generate on the tiny 4-head / 2-KV-head model with prompts of mixed lengths
(3, 9, 1, 6), 3 KV-cache slots for 4 prompts (refills) and an EOS that stops one answer early, then one
training step and another rollout. Compared with a single-process TorchEngine on the same weights:

- greedy tokens and finish reasons are identical, log-probs agree to 1e-5 (TP with and without sequence
  parallelism, FSDP, PP with tied embeddings and interleaved PP);
- seeded sampling (n=2) is identical at TP=2 and per FSDP rank; unseeded sampling agrees across tp ranks
  and differs across dp ranks given the same prompts;
- after an optimizer step the next rollout differs from the first and equals a fresh single-process engine
  on the updated weights; the step itself equals one process's (the rollout left training untouched);
- FSDP parameters are sharded again after the rollout with ``reshard_after_forward`` restored; a tp rank's
  KV cache holds only its KV heads; the PP copy is freed by ``finish_inference``.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from helpers import run_torchrun  # noqa: E402
from rollout_common import (  # noqa: E402
    TokenLoss, as_dict, eos_id, generation_config, greedy, job_config, make_batch, prompt_share, prompts,
    reference_model, reference_rollouts, seeded)

from aligner.wrappers import PolicyModel  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "parallel_rollouts.py"
CASES = {
    "tp2": {"layout": {"tp": 2, "dp_shard": 1}},
    "tp2_no_sp": {"layout": {"tp": 2, "dp_shard": 1, "sequence_parallel": False}},
    "dp2": {"layout": {"dp_shard": 2}},
    "replicate2": {"layout": {"dp_replicate": 2, "dp_shard": 1}},
    "pp2_tied": {"layout": {"pp": 2, "dp_shard": 1}, "tied": True},
    "pp2_interleaved": {"layout": {"pp": 2, "dp_shard": 1, "pp_schedule": "Interleaved1F1B"}},
}
# Four processes: TP inside FSDP (the all-gather gives tp-sharded weights), and PP x TP folded four ways.
CASES_4 = {
    "tp2_dp2": {"layout": {"tp": 2, "dp_shard": 2}},
    "pp2_tp2": {"layout": {"pp": 2, "tp": 2, "dp_shard": 1}},
}


def _run_worker(tmp_path_factory, cases: dict, nproc: int) -> dict:
    out = tmp_path_factory.mktemp(f"parallel_rollouts{nproc}")
    (out / "cases.json").write_text(json.dumps(cases))
    run_torchrun(WORKER, nproc, str(out), str(out / "cases.json"))
    results = {}
    for name in cases:
        ranks = [torch.load(out / f"{name}.rank{r}.pt") for r in range(nproc)]
        weights = {}
        for r in ranks:
            weights.update(r["weights"])
        results[name] = {"ranks": ranks, "weights": weights}
    return results


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    return _run_worker(tmp_path_factory, CASES, 2)


@pytest.fixture(scope="module")
def single_process_mesh():
    from aligner.parallel import ParallelDims, build_mesh, init_distributed

    init_distributed("gloo")
    if dist.get_world_size() != 1:
        pytest.skip("the single-process references need a world of one process")
    return build_mesh(ParallelDims(world_size=1))


def _share(rollouts: dict, rank: dict) -> dict:
    """The rows of ``rollouts`` (over all prompts) that ``rank``'s data-parallel share produced."""
    return {k: prompt_share(v, rank["dp_rank"], rank["dp_size"]) for k, v in rollouts.items()}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got["prompts"] == want["prompts"], what
    assert got["tokens"] == want["tokens"], what
    assert got["finish"] == want["finish"], what
    for g, w in zip(got["logprobs"], want["logprobs"]):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=0, atol=1e-5, msg=what)


def test_reference_covers_eos_and_length():
    ref = reference_rollouts(reference_model(), prompts(), greedy())
    assert sorted(set(ref.finish_reasons)) == ["eos", "length"]
    assert ref.response_token_ids[1][-1] == eos_id()


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_matches_one_process(parallel_results, name):
    ref = as_dict(reference_rollouts(reference_model(CASES[name].get("tied", False)), prompts(), greedy()))
    for r, rank in enumerate(parallel_results[name]["ranks"]):
        _assert_same(rank["before"], _share(ref, rank), f"{name} rank {r}")


@pytest.mark.parametrize("name", ["tp2", "tp2_no_sp", "dp2"])
def test_seeded_sampling_matches_one_process(parallel_results, name):
    model = reference_model()
    for r, rank in enumerate(parallel_results[name]["ranks"]):
        # A data-parallel rank samples as one process does on its prompts (n=2 rows per prompt).
        want = as_dict(reference_rollouts(model, prompt_share(prompts(), rank["dp_rank"], rank["dp_size"]), seeded()))
        _assert_same(rank["sampled"], want, f"{name} rank {r}")
        assert len(set(map(tuple, want["tokens"]))) == len(want["tokens"])  # really sampled: no two alike


def test_unseeded_sampling_agrees_over_tp_and_differs_over_dp(parallel_results):
    tp = [r["unseeded"] for r in parallel_results["tp2"]["ranks"]]
    assert tp[0] == tp[1]
    dp = [r["unseeded"] for r in parallel_results["dp2"]["ranks"]]
    assert dp[0]["prompts"] == dp[1]["prompts"]
    assert dp[0]["tokens"] != dp[1]["tokens"]


@pytest.mark.parametrize("name", list(CASES))
def test_rollout_after_step_uses_new_weights(parallel_results, name):
    tied = CASES[name].get("tied", False)
    fresh = as_dict(reference_rollouts(reference_model(tied, parallel_results[name]["weights"]), prompts(), greedy()))
    for r, rank in enumerate(parallel_results[name]["ranks"]):
        assert rank["after"]["tokens"] != rank["before"]["tokens"], f"{name} rank {r}: rollout did not change"
        _assert_same(rank["after"], _share(fresh, rank), f"{name} rank {r} after the step")


@pytest.fixture(scope="module")
def reference_step(single_process_mesh):
    """One process: rollouts, then the training step the workers ran (per tied setting)."""
    steps = {}
    for tied in (False, True):
        policy = PolicyModel(job_config(tied=tied), single_process_mesh)
        policy.set_total_steps(4)
        policy.configure_generation(generation_config(), tokenizer=[eos_id()])
        policy.prepare_for_inference()
        rollouts = policy.generate(prompts(), greedy())
        policy.finish_inference()
        steps[tied] = {"metrics": policy.train_step(make_batch(0), TokenLoss()), "rollouts": as_dict(rollouts),
                       "after": as_dict(policy.generate(prompts(), greedy())), "policy": policy}
    return steps


def test_policy_generate_in_one_process(reference_step):
    for tied in (False, True):
        step = reference_step[tied]
        _assert_same(step["rollouts"], as_dict(reference_rollouts(reference_model(tied), prompts(), greedy())),
                     f"tied={tied}")
        weights = {n: p.detach().clone() for n, p in step["policy"].model.named_parameters()}
        fresh = as_dict(reference_rollouts(reference_model(tied, weights), prompts(), greedy()))
        assert step["after"]["tokens"] != step["rollouts"]["tokens"]
        _assert_same(step["after"], fresh, f"tied={tied} after the step")


@pytest.mark.parametrize("name", list(CASES))
def test_training_step_unaffected_by_rollouts(parallel_results, reference_step, name):
    want = reference_step[CASES[name].get("tied", False)]["metrics"]
    for rank in parallel_results[name]["ranks"]:
        assert rank["metrics"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_fsdp_weights_resharded_after_rollout(parallel_results):
    for rank in parallel_results["dp2"]["ranks"]:
        assert rank["resharded"]
        before, after = rank["fsdp_flags"]
        assert before == after == [False] + [True] * 4  # the root stays gathered after forward, the 4 blocks do not


def test_tensor_parallel_cache_holds_local_kv_heads(parallel_results):
    assert [r["kv_heads"] for r in parallel_results["tp2"]["ranks"]] == [1, 1]  # 2 KV heads over tp=2
    assert [r["kv_heads"] for r in parallel_results["dp2"]["ranks"]] == [2, 2]


@pytest.mark.parametrize("name", ["pp2_tied", "pp2_interleaved"])
def test_pipeline_copy_freed_after_inference(parallel_results, name):
    for rank in parallel_results[name]["ranks"]:
        assert rank["copy_bytes_offloaded"] == 0
        assert rank["kv_heads"] == 2  # the copy is the whole model


def test_four_process_layouts_match_one_process(tmp_path_factory):
    results = _run_worker(tmp_path_factory, CASES_4, 4)
    ref = as_dict(reference_rollouts(reference_model(), prompts(), greedy()))
    for name, result in results.items():
        fresh = as_dict(reference_rollouts(reference_model(weights=result["weights"]), prompts(), greedy()))
        for r, rank in enumerate(result["ranks"]):
            _assert_same(rank["before"], _share(ref, rank), f"{name} rank {r}")
            _assert_same(rank["after"], _share(fresh, rank), f"{name} rank {r} after the step")
    assert [r["kv_heads"] for r in results["tp2_dp2"]["ranks"]] == [1] * 4
    assert all(r["resharded"] for r in results["tp2_dp2"]["ranks"])
