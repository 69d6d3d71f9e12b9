"""SFT tokenization with the real SmolLM2 chat template: loss exactly on the assistant replies + <|im_end|>."""
import dataclasses

import pytest
import torch

from aligner.data import DataError, collate, tokenize_conversation, tokenize_sft
from aligner.data.sft import assistant_segments

pytestmark = pytest.mark.slow  # needs the fetched SmolLM2 directory

SYSTEM = {"role": "system", "content": "Answer briefly."}
MULTI = [SYSTEM,
         {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Answer: Paris."},
         {"role": "user", "content": "And of Japan?"},
         {"role": "assistant", "content": "Answer: Tokyo, a city of 14 million people."},
         {"role": "user", "content": "Thanks!"},
         {"role": "assistant", "content": "You're welcome."}]


def loss_runs(example, tokenizer):
    """Decoded text of each contiguous run of loss tokens."""
    runs, current = [], []
    for token, is_loss in zip(example.input_ids.tolist(), example.loss_mask.tolist()):
        if is_loss:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_loss_tokens_are_exactly_each_assistant_reply_and_its_end_of_turn(smol_tokenizer):
    example = tokenize_conversation(MULTI, smol_tokenizer)
    assert loss_runs(example, smol_tokenizer) == ["Answer: Paris.<|im_end|>",
                                                  "Answer: Tokyo, a city of 14 million people.<|im_end|>",
                                                  "You're welcome.<|im_end|>"]
    # The pieces tokenize to the same ids as the whole render (ChatML pieces meet at special tokens).
    full = smol_tokenizer.apply_chat_template(MULTI)
    assert example.input_ids.tolist() == smol_tokenizer.encode(full.removesuffix("\n"))
    assert example.input_ids.dtype == torch.int32 and example.num_loss_tokens == int(example.loss_mask.sum())
    # The prompt part is exactly what the model is given at generation time.
    prompt = smol_tokenizer.apply_chat_template(MULTI[:2], add_generation_prompt=True)
    n_prompt = len(smol_tokenizer.encode(prompt))
    assert example.input_ids[:n_prompt].tolist() == smol_tokenizer.encode(prompt)
    assert not example.loss_mask[:n_prompt].any() and example.loss_mask[n_prompt]


def test_default_system_prompt_and_prompt_completion_records(smol_tokenizer):
    pair = {"prompt": "What is 2 + 2?", "completion": "Answer: 4."}
    chat = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Answer: 4."}]}
    examples, stats = tokenize_sft([(pair, "a:1"), (chat, "a:2")], smol_tokenizer, max_seq_len=512, overlong="truncate")
    assert torch.equal(examples[0].input_ids, examples[1].input_ids)
    assert torch.equal(examples[0].loss_mask, examples[1].loss_mask)
    text = smol_tokenizer.decode(examples[0].input_ids.tolist())
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the template's default
    assert loss_runs(examples[0], smol_tokenizer) == ["Answer: 4.<|im_end|>"]
    assert (stats.n_records, stats.n_examples, stats.n_truncated, stats.n_dropped) == (2, 2, 0, 0)
    assert stats.n_tokens == 2 * len(examples[0]) and stats.n_loss_tokens == 2 * int(examples[0].loss_mask.sum())


def test_collated_labels_are_the_next_loss_token(smol_tokenizer):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    examples = [tokenize_conversation(MULTI, smol_tokenizer), tokenize_conversation(short, smol_tokenizer)]
    batch = collate(examples, smol_tokenizer.pad_id)
    tokens, labels, attention = batch["tokens"], batch["labels"], batch["attention_mask"]
    assert set(batch) == {"tokens", "labels", "attention_mask"} and tokens.dtype == labels.dtype == torch.long
    T = len(examples[0])
    assert tokens.shape == (2, T) and attention[1].sum() == len(examples[1]) and attention[0].sum() == T
    assert (tokens[1, len(examples[1]):] == smol_tokenizer.pad_id).all()
    for i, example in enumerate(examples):
        L = len(example)
        has_label = labels[i] != -100
        assert torch.equal(has_label[:L - 1], example.loss_mask[1:])  # shifted by exactly one
        assert not has_label[L - 1:].any()  # the last real position and the padding predict nothing
        assert torch.equal(labels[i, :L - 1][has_label[:L - 1]], tokens[i, 1:L][example.loss_mask[1:]])
    # The label run of each reply decodes to the reply: the token before it predicts its first token.
    assert smol_tokenizer.decode(labels[1][labels[1] != -100].tolist()) == "Hello.<|im_end|>"


def test_truncation_and_drop_counts(smol_tokenizer):
    long_prompt = {"prompt": "word " * 400, "completion": "Answer: ok."}  # no reply token within 64
    long_reply = {"prompt": "Hi", "completion": "Answer: " + "yes " * 200}
    fits = {"prompt": "Hi", "completion": "Answer: hello."}
    records = [(long_prompt, "a:1"), (long_reply, "a:2"), (fits, "a:3")]
    examples, stats = tokenize_sft(records, smol_tokenizer, max_seq_len=64, overlong="truncate")
    assert (stats.n_records, stats.n_truncated, stats.n_dropped_no_loss, stats.n_dropped_overlong) == (3, 1, 1, 0)
    assert (stats.n_examples, stats.n_dropped) == (2, 1)
    assert [len(e) for e in examples] == [64, len(tokenize_conversation(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Answer: hello."}], smol_tokenizer))]
    full = tokenize_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant",
                                                                       "content": long_reply["completion"]}],
                                 smol_tokenizer)
    assert torch.equal(examples[0].input_ids, full.input_ids[:64])  # truncation keeps the start
    assert stats.n_tokens == 64 + len(examples[1])
    examples, stats = tokenize_sft(records, smol_tokenizer, max_seq_len=64, overlong="drop")
    assert (stats.n_truncated, stats.n_dropped_overlong, stats.n_dropped_no_loss, stats.n_examples) == (0, 2, 0, 1)
    assert "3 records -> 1 examples (0 truncated, 2 dropped as over-long" in stats.summary()


def test_a_template_that_is_not_prefix_stable_is_named(smol_tokenizer):
    counting = "{{ messages|length }} turns\n" + smol_tokenizer.chat_template
    tokenizer = dataclasses.replace(smol_tokenizer, chat_template=counting, source="models/counting")
    with pytest.raises(DataError) as e:
        assistant_segments(MULTI[1:3], tokenizer, "train.jsonl:3")
    message = str(e.value)
    assert message.startswith("train.jsonl:3: the chat template of models/counting is not prefix-stable at "
                              "messages[1]: ")
    assert "differ at character 0: '1 turns" in message and "'2 turns" in message


def test_a_template_that_rejects_the_conversation(smol_tokenizer):
    strict = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user "
              "turn') }}{% endif %}" + smol_tokenizer.chat_template)
    tokenizer = dataclasses.replace(smol_tokenizer, chat_template=strict, source="models/strict")
    with pytest.raises(DataError, match=r"^train.jsonl:3: the chat template of models/strict rejects this "
                                        r"conversation: Conversations must start with a user turn; "):
        assistant_segments(MULTI, tokenizer, "train.jsonl:3")
