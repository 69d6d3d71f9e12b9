"""collate_shared_prompt on hand-made pairs: what is shared, and what each branch keeps."""
import torch

from aligner.data import TokenizedExample, collate, collate_shared_prompt, pad_rows
from aligner.data.collate import shared_prefix_length


def example(ids: list[int], n_prompt: int) -> TokenizedExample:
    """``ids`` with the tokens after the first ``n_prompt`` as the response (loss)."""
    return TokenizedExample(torch.tensor(ids, dtype=torch.int32),
                            torch.tensor([False] * n_prompt + [True] * (len(ids) - n_prompt)))


def test_prompt_shared_but_for_its_last_token_and_responses_never_shared():
    # Both responses start with 7: a loss token, so it is not part of the shared prefix.
    chosen, rejected = example([1, 2, 3, 7, 8], 3), example([1, 2, 3, 7, 9, 4], 3)
    assert shared_prefix_length(chosen, rejected) == 2
    batch = collate_shared_prompt([(chosen, rejected)], pad_id=0, pad_to_multiple_of=8)
    assert batch["tokens"].tolist() == [[1, 2, 3, 7, 8, 3, 7, 9, 4, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 9 + [0] * 7]
    # The chosen branch's labels end at its last token; the rejected copy of token 3 predicts 7 again.
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, 7, 9, 4, -100] + [-100] * 7]
    two_rows = collate([chosen, rejected], pad_id=0)
    assert batch["labels"][0, :5].tolist() == two_rows["labels"][0, :5].tolist()
    assert batch["labels"][0, 5:9].tolist() == two_rows["labels"][1, 2:6].tolist()


def test_pairs_without_a_common_prompt_keep_two_whole_branches():
    chosen, rejected = example([5, 6, 7], 2), example([4, 6, 8], 2)
    assert shared_prefix_length(chosen, rejected) == 0
    # A one-token prompt: its only token predicts each response's first token, so nothing is shared either.
    batch = collate_shared_prompt([(chosen, rejected), (example([1, 2], 1), example([1, 3], 1))], pad_id=9)
    assert batch["tokens"].tolist() == [[5, 6, 7, 4, 6, 8], [1, 2, 1, 3, 9, 9]]
    assert batch["branch_ids"].tolist() == [[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 7, -100, -100, 8, -100], [2, -100, 3, -100, -100, -100]]


def test_pad_rows_pads_each_key_with_its_value_to_the_rounded_longest_row():
    """The one padding routine of collate, collate_shared_prompt and the online rollout rows."""
    rows = [{"tokens": torch.tensor([5, 6, 7]), "labels": torch.tensor([6, 7, -100]), "w": torch.tensor([0.5, 1.0, 0.0])},
            {"tokens": torch.tensor([8]), "labels": torch.tensor([-100]), "w": torch.tensor([2.0])}]
    out = pad_rows(rows, {"tokens": 0, "labels": -100, "w": -1.0}, multiple=4)
    assert out["tokens"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert out["labels"].tolist() == [[6, 7, -100, -100], [-100, -100, -100, -100]]
    assert out["w"].tolist() == [[0.5, 1.0, 0.0, -1.0], [2.0, -1.0, -1.0, -1.0]] and out["w"].dtype == torch.float32
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]] and out["attention_mask"].dtype == torch.long
    assert pad_rows(rows, {"tokens": 0}, multiple=1)["tokens"].shape == (2, 3)
