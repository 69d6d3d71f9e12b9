"""The self_rewarding section's checks: each bad value names its key and says what to do."""
from __future__ import annotations

import pytest

from aligner.config.jobs import SelfRewardingConfig
from aligner.trainers.self_rewarding import check_settings


def section(**kw) -> SelfRewardingConfig:
    return SelfRewardingConfig(**kw)


def test_defaults_pass_without_warnings():
    assert check_settings(section(), gbs=64, dp=1, iterations=3) == []


@pytest.mark.parametrize("kw, message", [
    ({"num_responses_to_gen": 1}, "num_responses_to_gen=1: a pair needs at least 2"),
    ({"judge_score_low": 5.0, "judge_score_high": 5.0}, "judge_score_low=5.0 must be below judge_score_high=5.0"),
    ({"length_control": 1.0}, "must be in [0, 1)"),
    ({"length_control": [0, 0, 1.5]}, "length_control[2] is 1.5"),
    ({"use_meta_judge": True, "meta_judge_pcnt": 0.01}, "leaves no meta-judge pair per rank"),
])
def test_bad_values_name_the_key(kw, message):
    with pytest.raises(ValueError, match="self_rewarding") as info:
        check_settings(section(**kw), gbs=8, dp=1, iterations=3)
    assert message in str(info.value)


def test_meta_judge_share_above_fifteen_percent_warns():
    warnings = check_settings(section(use_meta_judge=True, meta_judge_pcnt=0.25), gbs=64, dp=2, iterations=3)
    assert len(warnings) == 1 and "meta_judge_pcnt=0.25 is above 0.15" in warnings[0]
