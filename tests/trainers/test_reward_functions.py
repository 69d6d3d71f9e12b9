"""Reward functions by import path: resolution, weighting with None, output checks, and the error messages."""
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from aligner.algorithms import rewards
from aligner.trainers.reward_functions import (
    RewardFunctionError,
    RewardFunctions,
    prompts_and_columns,
    resolve_reward_function,
    reward_function_metrics,
)

ROOT = Path(__file__).resolve().parents[2]


def write_module(tmp_path, text, name="my_rewards.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_resolves_module_paths_builtin_names_and_files(tmp_path, monkeypatch):
    assert resolve_reward_function("aligner.algorithms.rewards:accuracy") is rewards.accuracy
    assert resolve_reward_function("format_reward") is rewards.format_reward
    write_module(tmp_path, "def constant(prompts, completions, **kw):\n    return [0.5] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    fn = resolve_reward_function("my_rewards.py:constant")  # relative to the current directory
    assert fn([], ["a", "b"]) == [0.5, 0.5]
    assert resolve_reward_function(f"{tmp_path}/my_rewards.py:constant") is fn  # one module per file
    brevity = resolve_reward_function(f"{ROOT}/examples/rewards.py:brevity")
    assert brevity(["q"] * 3, ["", "one two three four", "w " * 20]) == [1.0, 0.75, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("no_such_pkg.rewards:fn", r"reward function 'no_such_pkg.rewards:fn': no module named 'no_such_pkg.rewards'"),
    ("aligner.algorithms.rewards:acuracy", r"has no 'acuracy'; functions defined there: accuracy, completion_text"),
    ("aligner.algorithms.rewards:_TOLERANCE", r"'_TOLERANCE' is a float, not a function"),
    ("accuracyy", r"expected 'package.module:function' or 'path/to/file.py:function'.*built-ins: accuracy"),
    ("missing/file.py:fn", r"no file .*missing/file.py \(relative paths are relative to the current directory"),
    ("", r"expected a string"),
])
def test_bad_specs_name_the_spec_and_the_fix(spec, message):
    with pytest.raises(RewardFunctionError, match=message):
        resolve_reward_function(spec)


def test_a_module_that_fails_to_import_is_reported_as_such(tmp_path):
    path = write_module(tmp_path, "import not_installed_dependency_xyz\n", "needs_dep.py")
    with pytest.raises(RewardFunctionError, match=r"running .*needs_dep.py failed with ModuleNotFoundError"):
        resolve_reward_function(f"{path}:fn")


def test_weighted_sum_skips_none_like_trl_nansum():
    def first(prompts, completions, **kw):
        return [1.0, None, 0.5, None]

    def second(prompts, completions, **kw):
        return [0.0, 2.0, float("nan"), None]

    funcs = RewardFunctions([first, second], [1.0, 0.5])
    with pytest.warns(UserWarning, match=r"no function returned a reward for 1 of 4 completions \(first at index 3\)"):
        total, per_function = funcs(["p"] * 4, ["a", "b", "c", "d"], {})
    # row 0: 1*1 + 0.5*0; row 1: 0.5*2; row 2: 1*0.5 (NaN skipped); row 3: nothing applies -> 0
    assert total.tolist() == [1.0, 1.0, 0.5, 0.0]
    assert total.dtype == torch.float32
    assert per_function["first"].tolist()[0] == 1.0 and math.isnan(per_function["first"][1])
    assert funcs.names == ["first", "second"]
    metrics = reward_function_metrics(per_function)
    assert metrics["rewards/first/mean"] == pytest.approx(0.75)
    assert metrics["rewards/first/std"] == pytest.approx(math.sqrt(0.125))  # Bessel over [1.0, 0.5]
    assert metrics["rewards/second/mean"] == pytest.approx(1.0)
    assert metrics["rewards/second/std"] == pytest.approx(math.sqrt(2.0))


def test_builtins_by_path_with_columns_and_default_weights():
    funcs = RewardFunctions(["aligner.algorithms.rewards:accuracy", "aligner.algorithms.rewards:format_reward"])
    prompts, columns = prompts_and_columns([{"prompt": "Calculate 2 + 3.", "solution": "5"},
                                           {"prompt": "Calculate 9 - 4.", "solution": "5"},
                                           {"prompt": "Calculate 1 + 1.", "solution": "2"}])
    total, per_function = funcs(prompts, ["5", "9 - 4 = 5", "3"], columns)
    assert per_function["accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert per_function["format_reward"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == [2.0, 1.0, 1.0]


def test_trl_style_positional_and_column_selective_functions(tmp_path):
    seen = {}

    def trl_style(completions, **kwargs):  # TRL's examples omit prompts; it arrives in kwargs
        seen["trl"] = sorted(kwargs)
        return [float(len(c)) for c in completions]

    def positional(p, c):  # names neither: called positionally, gets no columns
        seen["positional"] = (p, c)
        return [1] * len(c)

    def picky(prompts, completions, level):  # no **kwargs: only the column it names
        return [np.float64(x) for x in level]

    funcs = RewardFunctions([trl_style, positional, picky], [1.0, 2.0, 1.0])
    total, _ = funcs(["p1", "p2"], ["ab", "abc"], {"level": [0.5, 1], "other": ["x", "y"]})
    assert total.tolist() == [2.0 + 2.0 + 0.5, 3.0 + 2.0 + 1.0]
    assert seen["trl"] == ["level", "other", "prompts"]
    assert seen["positional"] == (["p1", "p2"], ["ab", "abc"])


def test_accepts_tensors_arrays_and_bools():
    funcs = RewardFunctions([lambda prompts, completions, **kw: torch.tensor([1.0, 2.0]),
                             lambda prompts, completions, **kw: np.array([True, False])])
    total, per_function = funcs(["p", "q"], ["a", "b"])
    assert total.tolist() == [2.0, 2.0]
    assert funcs.names == ["<lambda>", "<lambda>_1"]  # unique metric names


@pytest.mark.parametrize("returned, message", [
    ([1.0], r"reward function 'bad' returned 1 values for 2 completions"),
    ([1.0, "0.5"], r"reward function 'bad' returned '0.5' \(str\) at index 1; return a float"),
    ([float("inf"), 0.0], r"reward function 'bad' returned inf at index 0; return a finite float"),
    (0.5, r"reward function 'bad' returned a float; return a list"),
])
def test_bad_outputs_name_the_function_and_the_index(returned, message):
    def bad(prompts, completions, **kw):
        return returned

    with pytest.raises(RewardFunctionError, match=message):
        RewardFunctions([bad])(["p", "q"], ["a", "b"])


def test_errors_for_weights_columns_and_raising_functions():
    with pytest.raises(RewardFunctionError, match=r"2 functions but 3 weights"):
        RewardFunctions(["accuracy", "format_reward"], [1.0, 1.0, 1.0])
    with pytest.raises(RewardFunctionError, match=r"weight nan at index 1 is not finite"):
        RewardFunctions(["accuracy", "format_reward"], [1.0, float("nan")])
    with pytest.raises(RewardFunctionError, match=r"none given"):
        RewardFunctions([])
    funcs = RewardFunctions(["accuracy"])
    funcs.check_columns(["prompt", "solution"])
    with pytest.raises(RewardFunctionError, match=r"'accuracy' requires the column 'solution', which the prompt "
                                                  r"records lack \(they have: answer\)"):
        funcs.check_columns(["prompt", "answer"])
    with pytest.raises(RewardFunctionError, match=r"'accuracy' raised ValueError: accuracy: solution 'x' at index 0"):
        funcs(["p"], ["1"], {"solution": ["x"]})
    with pytest.raises(RewardFunctionError, match=r"column 'solution' has 1 values for 2 completions"):
        funcs(["p", "q"], ["1", "2"], {"solution": ["1"]})
    with pytest.raises(RewardFunctionError, match=r"cannot be called as fn\(prompts, completions"):
        RewardFunctions([lambda only_one: [0.0]])


def test_prompts_and_columns_fills_missing_columns_with_none():
    prompts, columns = prompts_and_columns([{"prompt": [{"role": "user", "content": "hi"}], "solution": "1"},
                                           {"prompt": "text", "id": 7}])
    assert prompts == [[{"role": "user", "content": "hi"}], "text"]
    assert columns == {"solution": ["1", None], "id": [None, 7]}


def test_example_module_exact_answer_returns_none_where_no_solution():
    exact = resolve_reward_function(f"{ROOT}/examples/rewards.py:exact_answer")
    assert exact(["p"] * 3, ["19", "19.", "x = 19"], solution=["19", None, "19"]) == [1.0, None, 0.0]
    funcs = RewardFunctions([exact, "format_reward"], [1.0, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # format_reward applies where exact_answer does not: no warning
        total, _ = funcs(["p"] * 3, ["19", "19.", "x = 19"], {"solution": ["19", None, "19"]})
    assert total.tolist() == [1.5, 0.5, 0.0]
