"""The resumable data-parallel sampler: coverage, dp-invariant global batches, exact resume, reshuffling."""
import json
from collections import Counter

import pytest

from aligner.data import ResumableDistributedSampler


def global_batches(num_examples, dp_size, global_batch_size, steps, seed=3, **kwargs):
    """The union over ranks of each step's batch (rank order), for `steps` steps."""
    samplers = [ResumableDistributedSampler(num_examples, r, dp_size, global_batch_size, seed, **kwargs)
                for r in range(dp_size)]
    return [[i for s in samplers for i in s.next_batch()] for _ in range(steps)]


def test_an_epoch_covers_distinct_examples_and_ranks_are_disjoint():
    samplers = [ResumableDistributedSampler(50, r, 2, 8, seed=1) for r in range(2)]
    assert samplers[0].steps_per_epoch == 6 and len(samplers[0]) == 6 and samplers[0].local_batch_size == 4
    per_rank = [[list(b) for b in s] for s in samplers]  # one epoch each
    assert [len(b) for b in per_rank[0]] == [4] * 6
    seen = [i for rank in per_rank for batch in rank for i in batch]
    assert len(seen) == 48 and len(set(seen)) == 48  # 50 % 8 = 2 dropped, none repeated
    assert not set(i for b in per_rank[0] for i in b) & set(i for b in per_rank[1] for i in b)
    assert samplers[0].state_dict() == {"epoch": 1, "step_in_epoch": 0}


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one = global_batches(40, 1, 8, steps=12)  # 5 steps per epoch: crosses two epoch boundaries
    for dp in (2, 4, 8):
        assert global_batches(40, dp, 8, steps=12) == one  # same examples, same order: contiguous slices
    assert [Counter(b) for b in one] == [Counter(b) for b in global_batches(40, 2, 8, steps=12)]
    rank1 = ResumableDistributedSampler(40, 1, 2, 8, seed=3)
    assert rank1.next_batch() == one[0][4:8]


def test_resume_mid_epoch_continues_identically():
    straight = ResumableDistributedSampler(30, 1, 2, 6, seed=9)
    expected = [straight.next_batch() for _ in range(12)]  # 5 steps per epoch: 2.4 epochs
    first = ResumableDistributedSampler(30, 1, 2, 6, seed=9)
    got = [first.next_batch() for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))  # goes through the checkpoint's JSON
    assert state == {"epoch": 1, "step_in_epoch": 2}
    resumed = ResumableDistributedSampler(30, 1, 2, 6, seed=9)
    resumed.load_state_dict(state)
    assert len(resumed) == 3
    got += [list(b) for b in resumed]  # the rest of epoch 1 ...
    assert resumed.state_dict() == {"epoch": 2, "step_in_epoch": 0}
    got += [resumed.next_batch() for _ in range(2)]  # ... and on into epoch 2
    assert got == expected


def test_epochs_reshuffle_and_seeds_differ():
    s = ResumableDistributedSampler(64, 0, 1, 64, seed=5)
    epoch0, epoch1 = s.next_batch(), s.next_batch()
    assert sorted(epoch0) == sorted(epoch1) == list(range(64)) and epoch0 != epoch1
    assert ResumableDistributedSampler(64, 0, 1, 64, seed=6).next_batch() != epoch0
    assert ResumableDistributedSampler(64, 0, 1, 64, seed=5).next_batch() == epoch0
    ordered = ResumableDistributedSampler(10, 0, 1, 5, seed=5, shuffle=False)
    assert [ordered.next_batch() for _ in range(3)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]


def test_keep_last_completes_the_final_batch_from_the_epoch_start():
    s = ResumableDistributedSampler(10, 0, 1, 4, seed=0, shuffle=False, drop_last=False)
    assert s.steps_per_epoch == 3
    assert [list(b) for b in s] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"global_batch_size=6 is not divisible by the 4 data-parallel ranks"):
        ResumableDistributedSampler(100, 0, 4, 6, seed=0)
    with pytest.raises(ValueError, match=r"has 5 examples .* fewer than one global batch of 8"):
        ResumableDistributedSampler(5, 0, 1, 8, seed=0)
    s = ResumableDistributedSampler(16, 0, 1, 8, seed=0)
    with pytest.raises(ValueError, match=r"step_in_epoch=5 is outside this dataset's 2 steps per epoch"):
        s.load_state_dict({"epoch": 0, "step_in_epoch": 5})
