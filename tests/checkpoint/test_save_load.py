"""save_checkpoint / load_checkpoint in one process: bit-exact round trip (weights, AdamW, LR, RNG), files, errors."""
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_model

from aligner.checkpoint import MODEL_CONFIG_FILE, load_checkpoint, read_trainer_state, save_checkpoint
from aligner.checkpoint.rng import restore_rng_state, rng_file, save_rng_state
from aligner.models.args import config_from_hf, config_to_hf

sys.path.insert(0, str(Path(__file__).parent / "workers"))
import ckpt_train_state as ts  # noqa: E402


def _trained(seed: int, steps: int):
    model = tiny_model(seed=seed)
    optimizer, scheduler = ts.build_optimizer(model)
    for step in range(1, steps + 1):
        ts.train_step(model, optimizer, scheduler, step)
    return model, optimizer, scheduler


def _app_state(kind: str, model, optimizer, scheduler) -> dict:
    if kind == "policy":  # one wrapper object whose state dict nests model, optimizer and scheduler
        return {"policy": ts.PolicyState(model, optimizer, scheduler)}
    return ts.app_state(model, optimizer, scheduler)


@pytest.mark.parametrize("kind", ["separate", "policy"])
def test_same_layout_round_trip_is_bit_exact_including_rng(tmp_path, kind):
    model, optimizer, scheduler = _trained(seed=0, steps=2)
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    path = save_checkpoint(tmp_path, 2, _app_state(kind, model, optimizer, scheduler),
                           {"consumed_samples": 8, "sampler": {"epoch": 0, "index": 8}}, keep_last=2)
    draws_after_save = ts.random_draws()
    weights, moments, lr = ts.full_weights(model), ts.full_optimizer_state(model, optimizer), scheduler.get_last_lr()
    loss_3 = ts.train_step(model, optimizer, scheduler, 3)
    weights_3 = ts.full_weights(model)

    # A different init and fresh optimizer state: everything must come from the checkpoint.
    torch.manual_seed(99)
    model2 = tiny_model(seed=5)
    optimizer2, scheduler2 = ts.build_optimizer(model2)
    extra = load_checkpoint(path, _app_state(kind, model2, optimizer2, scheduler2))
    assert extra == {"consumed_samples": 8, "sampler": {"epoch": 0, "index": 8}, "step": 2}
    draws_after_load = ts.random_draws()
    assert torch.equal(draws_after_load["torch"], draws_after_save["torch"])
    assert draws_after_load["python"] == draws_after_save["python"]
    assert draws_after_load["numpy"] == draws_after_save["numpy"]
    for name, w in weights.items():
        assert torch.equal(ts.full_weights(model2)[name], w), name
    moments2 = ts.full_optimizer_state(model2, optimizer2)
    assert moments2.keys() == moments.keys()
    for name, state in moments.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments2[name][key], state[key]), (name, key)
    assert scheduler2.get_last_lr() == lr and scheduler2.last_epoch == 2
    assert ts.train_step(model2, optimizer2, scheduler2, 3) == loss_3
    for name, w in ts.full_weights(model2).items():
        assert torch.equal(w, weights_3[name]), name


def test_checkpoint_files(tmp_path):
    model_dir = tmp_path / "hf_model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (model_dir / "tokenizer_config.json").write_text("{}")
    model, optimizer, scheduler = _trained(seed=0, steps=1)
    path = save_checkpoint(tmp_path / "run", 1, ts.app_state(model, optimizer, scheduler), {"epoch": 0},
                           keep_last=1, model_dir=model_dir)
    assert path == tmp_path / "run" / "checkpoints" / "step_1"
    assert (path.parent / "latest").read_text() == "step_1\n"
    assert read_trainer_state(path) == {"epoch": 0, "step": 1}
    # model_config.json comes from app_state["model"].config and maps back to the same config.
    with open(path / MODEL_CONFIG_FILE) as f:
        saved = json.load(f)
    assert saved == config_to_hf(model.config)
    assert config_from_hf(saved).num_params == model.config.num_params
    assert (path / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert (path / "tokenizer_config.json").is_file() and not (path / "merges.txt").exists()
    assert sorted(p.name for p in (path / "rng").iterdir()) == ["rank_0.pt"]
    assert (path / ".metadata").is_file() and list(path.glob("*.distcp"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest", "step_1"]  # no tmp left behind


def test_rng_for_a_rank_the_saved_run_did_not_have(tmp_path):
    torch.manual_seed(3)
    save_rng_state(tmp_path, rank=0, world_size=1)
    rank0_next = torch.rand(4)
    assert restore_rng_state(tmp_path, rank=0) == "restored" and torch.equal(torch.rand(4), rank0_next)
    assert restore_rng_state(tmp_path, rank=1) == "reseeded"
    rank1_a = torch.rand(4)
    restore_rng_state(tmp_path, rank=1)
    assert torch.equal(torch.rand(4), rank1_a)  # deterministic
    restore_rng_state(tmp_path, rank=2)
    rank2 = torch.rand(4)
    assert not torch.equal(rank1_a, rank0_next) and not torch.equal(rank2, rank1_a)  # distinct streams
    assert restore_rng_state(tmp_path / "nothing", rank=0) == "absent"
    assert rng_file(tmp_path, 0).is_file()


def test_bad_inputs_name_the_problem(tmp_path):
    model, optimizer, scheduler = _trained(seed=0, steps=1)
    state = ts.app_state(model, optimizer, scheduler)
    with pytest.raises(TypeError, match="JSON-able"):
        save_checkpoint(tmp_path, 1, state, {"loss": torch.tensor(1.0)}, keep_last=1)
    with pytest.raises(ValueError, match="keep_last=0"):
        save_checkpoint(tmp_path, 1, state, {}, keep_last=0)
    with pytest.raises(ValueError, match=r"extra\['step'\]=3 disagrees with step=1"):
        save_checkpoint(tmp_path, 1, state, {"step": 3}, keep_last=1)
    assert not (tmp_path / "checkpoints").exists()  # nothing half-written
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_checkpoint(tmp_path / "nope", state)
    path = save_checkpoint(tmp_path, 1, state, {}, keep_last=1)
    bigger = tiny_model(seed=0, hidden_size=128)
    opt_b, sched_b = ts.build_optimizer(bigger)
    with pytest.raises(RuntimeError, match=f"loading checkpoint {path}"):
        load_checkpoint(path, ts.app_state(bigger, opt_b, sched_b))
