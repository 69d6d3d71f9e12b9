"""A checkpoint saved at TP=2 loads at TP=1, at FSDP dp_shard=2 and at TP=2 (2 gloo processes each).

Model weights and AdamW moments come back as saved, the next step equals continuing at TP=2 (within
1e-5: reduction order differs between layouts; bit-exact at the same layout, RNG included), and the
checkpoint exports to a Hugging Face directory with the same weights.
"""
import json
from pathlib import Path

import pytest
import torch
from helpers import run_torchrun

from aligner.checkpoint import export_hf, find_resume_checkpoint
from aligner.models import from_pretrained

WORKER = Path(__file__).parent / "workers" / "reshard.py"
TP1, TP2, FSDP2 = json.dumps({}), json.dumps({"tp": 2}), json.dumps({"dp_shard": 2})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    out = tmp / "run"
    run_torchrun(WORKER, 2, "save", str(out), str(tmp / "saved.pt"))
    run_torchrun(WORKER, 1, "load", str(out), str(tmp / "loaded1.pt"), f"[{TP1}]")
    run_torchrun(WORKER, 2, "load", str(out), str(tmp / "loaded2.pt"), f"[{TP2}, {FSDP2}]")
    loaded = {**torch.load(tmp / "loaded1.pt"), **torch.load(tmp / "loaded2.pt")}
    return {"out": out, "saved": torch.load(tmp / "saved.pt"), "loaded": loaded}


def assert_state_equal(got: dict, want: dict, atol: float) -> None:
    assert got["weights"].keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    assert got["moments"].keys() == want["moments"].keys()
    for name, state in want["moments"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got["moments"][name][key], state[key], rtol=0, atol=atol,
                                       msg=lambda m: f"{name} {key}: {m}")
    assert got["lr"] == want["lr"]
    assert got["extra"] == {"consumed_samples": 8, "losses": got["extra"]["losses"], "step": 2}


def assert_draws_equal(got: dict, want: dict) -> None:
    """The next torch, Python and NumPy random numbers of one rank are the same."""
    assert torch.equal(got["torch"], want["torch"])
    assert got["python"] == want["python"] and got["numpy"] == want["numpy"]


@pytest.mark.parametrize("layout", [TP1, FSDP2])
def test_tp2_checkpoint_loads_at_another_layout(runs, layout):
    saved, got = runs["saved"], runs["loaded"][layout]
    assert_state_equal(got, saved, atol=1e-6)
    # The next step from the loaded state equals continuing the TP=2 run.
    assert abs(got["loss_3"] - saved["loss_3"]) <= 1e-5 * abs(saved["loss_3"])
    for name, w in saved["weights_3"].items():
        torch.testing.assert_close(got["weights_3"][name], w, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_rng_restored_per_rank_where_the_rank_existed(runs):
    saved = runs["saved"]["draws"]
    assert saved[0]["torch"].ne(saved[1]["torch"]).all()  # the ranks' streams differ
    # TP=1 (one process): rank 0 continues rank 0's streams; dp_shard=2: same world size, every rank.
    assert_draws_equal(runs["loaded"][TP1]["draws"][0], saved[0])
    for rank in range(2):
        assert_draws_equal(runs["loaded"][FSDP2]["draws"][rank], saved[rank])


def test_same_layout_resume_is_bit_exact(runs):
    saved, got = runs["saved"], runs["loaded"][TP2]
    assert_state_equal(got, saved, atol=0)
    assert got["loss_3"] == saved["loss_3"]
    for name, w in saved["weights_3"].items():
        assert torch.equal(got["weights_3"][name], w), name
    for rank in range(2):
        assert_draws_equal(got["draws"][rank], saved["draws"][rank])


def test_tp2_checkpoint_exports_full_weights(runs, tmp_path):
    ckpt = find_resume_checkpoint(runs["out"], "auto")
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    exported = from_pretrained(hf_dir).state_dict()
    for name, w in runs["saved"]["weights"].items():
        assert torch.equal(exported[name], w), name
