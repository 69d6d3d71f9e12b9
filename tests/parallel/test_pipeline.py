"""Pipeline parallelism equals the single-process model: loss, gradients, log-probs, one AdamW step.

The multi-process cases run in one torchrun launch per layout (tests/parallel/workers/pp_*.py); each rank
saves what its stage computed and the tests here compare it with a single-process reference.
"""
import sys
from pathlib import Path

import pytest
import torch

from aligner.parallel.pipeline import (cut_to_stage, split_layers, split_microbatches, stage_ids_this_rank,
                                       stages_per_rank)
from helpers import run_torchrun, tiny_model

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from pp_common import make_batch, reference_step  # noqa: E402

TOL = 1e-5
# name: (tie_word_embeddings, padded, layers held by pp rank 0 and 1)
PP_CASES = {
    "1f1b": (False, False, (["0", "1"], ["2", "3"])),
    "gpipe": (False, False, (["0", "1"], ["2", "3"])),
    "tied": (True, False, (["0", "1"], ["2", "3"])),
    "padded": (False, True, (["0", "1"], ["2", "3"])),
    "interleaved": (True, True, (["0", "2"], ["1", "3"])),  # looped: stage s on rank s % 2
    "checkpoint": (True, False, (["0", "1"], ["2", "3"])),  # stages loaded from the saved tied model
}


def test_split_layers_is_even_with_remainder_first():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_layers(8, 2, num_stages_per_rank=2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_ids_this_rank(1, 2, num_stages_per_rank=2) == [1, 3]
    assert [stages_per_rank(s) for s in ("1F1B", "GPipe", "Interleaved1F1B")] == [1, 1, 2]
    with pytest.raises(ValueError, match="parallel.pp=4"):
        split_layers(3, 4)
    with pytest.raises(ValueError, match="parallel.pp_schedule='1f1b' is unknown"):
        stages_per_rank("1f1b")


def test_cut_to_stage_keeps_full_model_names():
    full = dict(tiny_model(0).named_parameters())
    first = cut_to_stage(tiny_model(0), 0, 2, [0, 1])
    last = cut_to_stage(tiny_model(0), 1, 2, [2, 3])
    assert first.output is None and first.norm is None and last.tok_embeddings is None
    names = list(dict(first.named_parameters())) + list(dict(last.named_parameters()))
    assert sorted(names) == sorted(full)
    # The two stages chained equal the full model.
    tokens = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(last(first(tokens)), tiny_model(0)(tokens), rtol=0, atol=1e-6)
    assert cut_to_stage(tiny_model(0, tie_word_embeddings=True), 1, 2, [2, 3]).pipeline_stage.tied_embeddings
    with pytest.raises(ValueError, match="already pipeline stage"):
        cut_to_stage(first, 0, 2, [0])


def test_split_microbatches_splits_per_sample_values_only():
    batch = make_batch(seed=1, padded=True)
    batch["ids"] = list(range(8))
    mbs = split_microbatches(batch, 4)
    assert [mb["tokens"].shape[0] for mb in mbs] == [2, 2, 2, 2]
    assert mbs[3]["ids"] == [6, 7] and all(mb["num_loss_tokens"] is batch["num_loss_tokens"] for mb in mbs)
    with pytest.raises(ValueError, match="not divisible by 3"):
        split_microbatches(batch, 3)


@pytest.fixture(scope="module")
def pp2_results(tmp_path_factory):
    from aligner.models.hf import save_hf_checkpoint

    out = tmp_path_factory.mktemp("pp2") / "out"
    checkpoint = save_hf_checkpoint(tiny_model(0, tie_word_embeddings=True), None, out.parent / "tied_ckpt")
    run_torchrun(WORKERS / "pp_train.py", 2, str(out), str(checkpoint))
    return [torch.load(f"{out}.rank{r}.pt") for r in range(2)]


def _reference_name(name: str, tied: bool) -> str:
    # The last stage's copy of a tied embedding is the full model's embedding.
    return "tok_embeddings.weight" if tied and name == "output.weight" else name


@pytest.mark.parametrize("case", list(PP_CASES))
def test_pp2_equals_single_process(pp2_results, case):
    tied, padded, layers = PP_CASES[case]
    ref = reference_step(tiny_model(0, tie_word_embeddings=tied), make_batch(seed=1, padded=padded))
    first, last = (r[case] for r in pp2_results)
    assert (first["layers"], last["layers"]) == layers
    for rank in (first, last):  # loss, metrics and log-probs come back on every pp rank
        assert abs(rank["loss"].item() - ref["loss"].item()) < TOL
        assert abs(rank["metrics"]["sum_logp"].item() - ref["metrics"]["sum_logp"].item()) < 1e-3
        torch.testing.assert_close(rank["logprobs"], ref["logprobs"], rtol=0, atol=TOL)
        # The second step (cached schedule) sees the weights after the AdamW step.
        assert abs(rank["loss_after"].item() - ref["loss_after"].item()) < TOL
    seen = set()
    for rank in (first, last):
        for name, grad in rank["grads"].items():
            ref_name = _reference_name(name, tied)
            seen.add(ref_name)
            torch.testing.assert_close(grad, ref["grads"][ref_name], rtol=0, atol=TOL, msg=f"grad of {name}")
            torch.testing.assert_close(rank["weights"][name], ref["weights"][ref_name], rtol=0, atol=TOL,
                                       msg=f"{name} after AdamW")
    assert seen == set(ref["grads"])
    if tied:  # both copies hold the summed gradient, so they stay bit-identical after the step
        assert torch.equal(first["weights"]["tok_embeddings.weight"], last["weights"]["output.weight"])
        assert torch.equal(first["grads"]["tok_embeddings.weight"], last["grads"]["output.weight"])


@pytest.fixture(scope="module")
def hybrid_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp_hybrid") / "out"
    run_torchrun(WORKERS / "pp_hybrid.py", 4, str(out))
    return [torch.load(f"{out}.rank{r}.pt") for r in range(4)]


# name: (tie_word_embeddings, padded); ranks 0-1 hold stage 0, ranks 2-3 stage 1 (pp is the outer mesh dim).
HYBRID_CASES = {"pp2_tp2": (True, True), "pp2_dp2": (False, False)}


@pytest.mark.parametrize("case", list(HYBRID_CASES))
def test_pp2_with_tp_or_fsdp_equals_single_process(hybrid_results, case):
    from aligner.parallel import seeded_init_

    tied, padded = HYBRID_CASES[case]
    # The workers build with the loader's per-name seeded init; the reference uses the same rule.
    ref = reference_step(seeded_init_(tiny_model(0, tie_word_embeddings=tied), seed=0),
                         make_batch(seed=1, padded=padded))
    seen = set()
    for rank, result in enumerate(r[case] for r in hybrid_results):
        assert result["stage_index"] == rank // 2
        assert abs(result["loss"].item() - ref["loss"].item()) < TOL
        assert result["accumulation_error"] < 1e-6
        rows = slice(*result["rows"])  # pp2_dp2: each dp rank ran half of the batch through its pipeline
        torch.testing.assert_close(result["logprobs"], ref["logprobs"][rows], rtol=0, atol=TOL)
        for name, grad in result["grads"].items():
            ref_name = _reference_name(name, tied)
            seen.add(ref_name)
            torch.testing.assert_close(grad, ref["grads"][ref_name], rtol=0, atol=TOL, msg=f"{case} grad of {name}")
            torch.testing.assert_close(result["weights"][name], ref["weights"][ref_name], rtol=0, atol=TOL,
                                       msg=f"{case} {name} after AdamW")
    assert seen == set(ref["grads"])
