"""The checkpoints/ directory: keep_last, the latest pointer, resume=never|auto|PATH, re-saves, leftovers."""
import os

import pytest
import torch

from aligner.checkpoint import (
    checkpoint_step, find_resume_checkpoint, is_complete_checkpoint, list_checkpoints, load_checkpoint,
    save_checkpoint,
)


class Values:
    """A minimal app_state object: one tensor whose value records which save wrote it."""

    def __init__(self, value: float = 0.0):
        self.w = torch.full((8,), float(value))

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"]


def save(out, step, keep_last=2, value=None):
    return save_checkpoint(out, step, {"values": Values(step if value is None else value)},
                           {"consumed_samples": 4 * step}, keep_last=keep_last)


def loaded_value(path) -> float:
    target = Values(-1.0)
    load_checkpoint(path, {"values": target})
    return float(target.w[0])


def names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.mark.parametrize("keep_last, kept", [(1, [4]), (2, [3, 4]), (-1, [1, 2, 3, 4])])
def test_keep_last_prunes_the_oldest(tmp_path, keep_last, kept):
    for step in range(1, 5):
        save(tmp_path, step, keep_last=keep_last)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == kept
    assert names(tmp_path) == sorted(["latest"] + [f"step_{s}" for s in kept])
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_4\n"
    assert [loaded_value(p) for p in list_checkpoints(tmp_path)] == [float(s) for s in kept]


def test_resume_never_auto_and_path(tmp_path):
    assert find_resume_checkpoint(tmp_path, "auto") is None  # fresh run: no checkpoints directory
    for step in (1, 2, 3):
        save(tmp_path, step, keep_last=-1)
    ckpts = tmp_path / "checkpoints"
    assert find_resume_checkpoint(tmp_path, "never") is None
    assert find_resume_checkpoint(tmp_path, "auto") == ckpts / "step_3"
    assert find_resume_checkpoint(tmp_path / "elsewhere", str(ckpts / "step_2")) == ckpts / "step_2"
    # `latest` is authoritative, even over a higher step (a run resumed from an earlier checkpoint).
    (ckpts / "latest").write_text("step_2\n")
    assert find_resume_checkpoint(tmp_path, "auto") == ckpts / "step_2"
    # A pointer to something missing, incomplete or outside checkpoints/: the highest complete step.
    for bad in ("step_9\n", "", "../../etc\n"):
        (ckpts / "latest").write_text(bad)
        assert find_resume_checkpoint(tmp_path, "auto") == ckpts / "step_3"
    (ckpts / "step_3" / "trainer_state.json").unlink()  # e.g. hand-damaged
    assert find_resume_checkpoint(tmp_path, "auto") == ckpts / "step_2"
    (ckpts / "latest").unlink()
    assert find_resume_checkpoint(tmp_path, "auto") == ckpts / "step_2"


def test_bad_resume_path_names_the_path(tmp_path):
    save(tmp_path, 5)
    missing = tmp_path / "checkpoints" / "step_7"
    with pytest.raises(FileNotFoundError, match=f"trainer.resume: {missing} does not exist"):
        find_resume_checkpoint(tmp_path, str(missing))
    # The output directory instead of a checkpoint: the error lists what it holds.
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a complete checkpoint.*"
                                                f"contains complete checkpoints: {tmp_path}/checkpoints/step_5"):
        find_resume_checkpoint(tmp_path, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is a file"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "latest"))
    with pytest.raises(ValueError, match="trainer.resume is empty"):
        find_resume_checkpoint(tmp_path, "")


def test_saving_an_earlier_step_keeps_it_and_points_latest_at_it(tmp_path):
    for step in (4, 5, 6):
        save(tmp_path, step)
    resumed = find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step_5"))
    assert loaded_value(resumed) == 5.0
    save(tmp_path, 6, value=60)  # the resumed run saves step 6 again: replaced, not deleted
    save(tmp_path, 7)
    assert names(tmp_path) == ["latest", "step_6", "step_7"]
    assert loaded_value(tmp_path / "checkpoints" / "step_6") == 60.0
    save(tmp_path, 3, keep_last=1)  # lower than every existing step: still kept, still latest
    assert names(tmp_path) == ["latest", "step_3"]
    assert find_resume_checkpoint(tmp_path, "auto") == tmp_path / "checkpoints" / "step_3"


def test_resave_of_the_same_step_replaces_it(tmp_path):
    save(tmp_path, 2, keep_last=1)
    path = save(tmp_path, 2, keep_last=1, value=20)
    assert names(tmp_path) == ["latest", "step_2"]
    assert loaded_value(path) == 20.0


def test_leftovers_of_crashed_saves_are_cleaned_or_recovered(tmp_path):
    save(tmp_path, 1, keep_last=-1)
    save(tmp_path, 2, keep_last=-1)
    ckpts = tmp_path / "checkpoints"
    # A crash mid-save, mid-delete, and between the two renames of a re-save of step 2.
    (ckpts / "step_3.tmp-123-abc").mkdir()
    (ckpts / "step_3.tmp-123-abc" / "__0_0.distcp").write_bytes(b"partial")
    (ckpts / "step_1.deleting-9-x").mkdir()
    os.rename(ckpts / "step_2", ckpts / "step_2.old-5-y")
    assert find_resume_checkpoint(tmp_path, "auto") == ckpts / "step_2.old-5-y"  # latest says step_2
    assert checkpoint_step(ckpts / "step_2.old-5-y") == 2 and loaded_value(ckpts / "step_2.old-5-y") == 2.0
    assert not is_complete_checkpoint(ckpts / "step_3.tmp-123-abc")
    save(tmp_path, 3, keep_last=-1)
    assert names(tmp_path) == ["latest", "step_1", "step_2", "step_3"]  # step_2 put back, garbage gone
    assert loaded_value(ckpts / "step_2") == 2.0
