"""Record validation: each bad record gives `file:line: field '...': what is wrong; what to do`."""
import pytest

from aligner.data import DataError, read_records, sft_messages, validate_record, validate_records

W = "train.jsonl:7"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def error_of(record, fmt="sft"):
    with pytest.raises(DataError) as e:
        validate_record(record, W, fmt)
    return str(e.value)


@pytest.mark.parametrize("record", [
    {"messages": [user("Hi"), assistant("Hello.")]},
    {"messages": [{"role": "system", "content": ""}, user(""), assistant("A"), user("B"), assistant("C")],
     "prompt": "ignored"},
    {"prompt": "2 + 2?", "completion": "4."},
    {"prompt": [{"role": "system", "content": "Be brief."}, user("2 + 2?")], "completion": "4."},
])
def test_valid_sft_records(record):
    validate_record(record, W, "sft")


def test_sft_errors_name_line_field_problem_and_fix():
    assert error_of({"messages": [user("Hi"), assistant("Hello."), {"role": "user", "content": 3}]}) == (
        "train.jsonl:7: field 'messages[2].content': expected a string, got int; write the text as a JSON string")
    assert error_of({"messages": [user("Hi"), {"role": "bot", "content": "x"}]}) == (
        "train.jsonl:7: field 'messages[1].role': unknown role 'bot'; use one of system, user, assistant")
    assert error_of({"messages": [user("Hi"), assistant(" \n")]}) == (
        "train.jsonl:7: field 'messages[1].content': empty response; write the response, remove the record, "
        "or set data.empty_response=skip")
    assert error_of({"messages": [user("Hi")]}) == (
        "train.jsonl:7: field 'messages': no assistant turn, so nothing to train on; add an assistant message or "
        "remove the record")
    assert error_of({"messages": [user("Hi"), {"content": "x"}]}) == (
        "train.jsonl:7: field 'messages[1].role': missing; every message needs \"role\" and \"content\"")
    assert error_of({"messages": "Hi"}) == (
        "train.jsonl:7: field 'messages': expected a list of messages, got string; write "
        '[{"role": "user", "content": "..."}, ...]')
    assert error_of({"messages": []}).startswith("train.jsonl:7: field 'messages': empty list of messages;")
    assert error_of({"messages": [user("Hi"), "Hello."]}).startswith(
        "train.jsonl:7: field 'messages[1]': expected a message object, got string;")
    assert error_of({"prompt": "2 + 2?"}) == (
        "train.jsonl:7: field 'completion': missing; a record of this format is "
        '{"prompt": ..., "completion": ...} (this one has: prompt)')
    assert error_of({"prompt": "2 + 2?", "completion": None}) == (
        "train.jsonl:7: field 'completion': expected a string, got null; write the text as a JSON string")
    assert error_of({"prompt": 5, "completion": "x"}).startswith(
        "train.jsonl:7: field 'prompt': expected a string or a list of messages, got int;")
    assert error_of({"text": "hello"}) == (
        "train.jsonl:7: neither 'messages' nor 'prompt'/'completion' (the record has: text); an SFT record is "
        '{"messages": [...]} or {"prompt": ..., "completion": ...}')


def test_preference_kto_and_prompt_formats():
    validate_record({"prompt": "Q", "chosen": "good", "rejected": "bad"}, W, "preference")
    validate_record({"prompt": [user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}, W,
                    "preference")
    validate_record({"prompt": "Q", "completion": "A", "label": False}, W, "kto")
    validate_record({"prompt": "Q", "solution": 42}, W, "prompt")
    assert error_of({"prompt": "Q", "chosen": "good"}, "preference") == (
        "train.jsonl:7: field 'rejected': missing; a record of this format is "
        '{"prompt": ..., "chosen": ..., "rejected": ...} (this one has: chosen, prompt)')
    assert error_of({"prompt": "Q", "chosen": [assistant("a"), user("b")], "rejected": "c"}, "preference") == (
        "train.jsonl:7: field 'chosen[1].role': the response ends with a 'user' turn; end the response with the "
        "assistant's reply")
    assert error_of({"prompt": "Q", "chosen": "a", "rejected": ""}, "preference").startswith(
        "train.jsonl:7: field 'rejected': empty response;")
    assert error_of({"prompt": "Q", "completion": "A", "label": 1}, "kto") == (
        "train.jsonl:7: field 'label': expected true or false, got int 1; write the label as a JSON boolean "
        "(true: desirable, false: undesirable)")
    assert error_of({"question": "Q"}, "prompt").startswith("train.jsonl:7: field 'prompt': missing;")
    assert error_of({"prompt": "  "}, "prompt").startswith("train.jsonl:7: field 'prompt': empty prompt;")


def test_every_record_is_checked_and_the_error_lists_the_others(write_jsonl):
    good = {"messages": [user("Hi"), assistant("Hello.")]}
    path = write_jsonl("train.jsonl", [good, {"prompt": "x"}, good, {"prompt": "x", "completion": 1},
                                       {"messages": [user("Hi"), assistant("")]}])
    with pytest.raises(DataError) as e:
        validate_records(read_records(path), "sft")
    first, rest = str(e.value).split("\n")
    assert first.startswith(f"{path}:2: field 'completion': missing;")
    assert rest == f"(2 more invalid records: {path}:4, {path}:5)"


def test_empty_responses_can_be_skipped(write_jsonl):
    good = {"messages": [user("Hi"), assistant("Hello.")]}
    path = write_jsonl("train.jsonl", [good, {"prompt": "x", "completion": " "}, good])
    kept, skipped = validate_records(read_records(path), "sft", empty_response="skip")
    assert skipped == 1 and [where for _, where in kept] == [f"{path}:1", f"{path}:3"]
    with pytest.raises(DataError, match=r":2: field 'completion': empty response"):
        validate_records(read_records(path), "sft", empty_response="error")


def test_prompt_completion_becomes_a_conversation():
    assert sft_messages({"prompt": "Q", "completion": "A"}) == [user("Q"), assistant("A")]
    system = {"role": "system", "content": "S"}
    assert sft_messages({"prompt": [system, user("Q")], "completion": "A"}) == [system, user("Q"), assistant("A")]
