"""Built-in rule rewards: number parsing, accuracy against a solution column, the answer-only format."""
import json
from pathlib import Path

import pytest

from aligner.algorithms.rewards import accuracy, completion_text, format_reward, last_number, parse_number

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7.", 7.0),                      # a sentence's full stop is not a decimal point
    ("It is -12.", -12.0),                    # a sign after a space
    ("x=-5", -5.0),
    ("(\u22127)", -7.0),                      # U+2212 minus sign
    ("5-3", 3.0),                             # a minus between digits is subtraction
    ("10 - 3 is 7", 7.0),
    ("1,250 apples", 1250.0),                 # thousands commas
    ("$1,234.50 in total", 1234.5),
    ("the numbers 3,4,5", 5.0),               # a list is not a thousands group
    ("pi is 3.14 and e is 2.", 2.0),
    ("first 12, then 0.5", 0.5),
    ("**42**", 42.0),
    ("no digits here", None),
    ("", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("42", 42.0), (" -7. ", -7.0), ("1,024", 1024.0), ("\u22123", -3.0), ("2.50", 2.5), ("0", 0.0),
    ("3 + 4", None), (".5", None), ("1,02", None), ("The answer is 4.", None), ("", None), ("4..", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_accuracy_scores_the_last_number_against_the_solution():
    completions = ["3 + 4 = 7", "The answer is 7.", "7 apples, not 8", "-3", "It is 1,000.", "seven", "12.0", "-3"]
    solution = ["7", 7, "7", "-3", "1000", "7", 12, "3"]
    assert accuracy([""] * 8, completions, solution) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def test_accuracy_none_solution_is_not_applicable_and_messages_use_the_last_content():
    completions = ["7", [{"role": "assistant", "content": "it is 9"}], "5"]
    assert accuracy(["a", "b", "c"], completions, [None, "9", "5.0"], extra=[1, 2, 3]) == [None, 1.0, 1.0]
    assert completion_text([]) == ""


def test_accuracy_errors_name_the_index_and_the_fix():
    with pytest.raises(ValueError, match=r"solution 'forty' at index 1 is not a number"):
        accuracy(["", ""], ["1", "2"], ["1", "forty"])
    with pytest.raises(ValueError, match=r"2 completions but 1 solutions"):
        accuracy(["", ""], ["1", "2"], ["1"])


def test_format_reward_wants_the_number_alone():
    completions = ["42", " 42.\n", "-7", "1,024", "3 + 4 = 7", "The answer is 7.", "7 apples", "",
                   [{"role": "assistant", "content": "19"}]]
    assert format_reward([""] * 9, completions) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_shipped_arithmetic_data_is_consistent():
    """The shipped files: sizes, disjoint splits, and every solution right by the reward's own parser."""
    splits = {}
    for name, size in (("train", 500), ("val", 100)):
        records = [json.loads(line) for line in (DATA / f"arithmetic_{name}.jsonl").read_text().splitlines()]
        assert len(records) == size
        for r in records:
            assert set(r) == {"prompt", "solution"}
            # "Calculate 12 + 7. Reply with only the result." -> the last number of the right answer is 19
            a, op, b = r["prompt"].split(".")[0].split()[1:4]
            answer = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert answer >= 0 and r["solution"] == str(answer)
            assert accuracy([r["prompt"]], [f"{a} {op} {b} = {answer}."], [r["solution"]]) == [1.0]
        splits[name] = {r["prompt"] for r in records}
        assert len(splits[name]) == size  # no duplicates within a split
    assert not splits["train"] & splits["val"]
