"""Our tokenizer.json (rebuilt from the GGUF) and chat template against transformers' tokenizers."""
import pytest
from jinja2.exceptions import TemplateError

transformers = pytest.importorskip("transformers")

from aligner.models.fetch import fetch_gguf, smollm2_path  # noqa: E402
from aligner.models.tokenizer import ChatTokenizer, compile_chat_template, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 1234567 people paid $3.50 each -- 99.9% of them on 12/31.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))  # 55",
    "Ünïcödé: naïve café, 東京タワー, Привет мир, emoji 🤖🚀 and a zero-width\u200bjoiner",
    "   leading spaces,   inner  runs\n\n\nand trailing   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "It's they're we've I'm you'll he'd -- contractions",
]
CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 3?"},
]


@pytest.fixture(scope="module")
def smol_dir():
    return smollm2_path()


@pytest.fixture(scope="module")
def ours(smol_dir) -> ChatTokenizer:
    return load_tokenizer(smol_dir)


@pytest.fixture(scope="module")
def from_dir(smol_dir):
    """transformers' tokenizer loaded from the converted directory (our tokenizer.json and config)."""
    return transformers.AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def from_gguf(tmp_path_factory):
    """transformers' own tokenizer, built by its GGUF loader from the original file."""
    gguf_file = fetch_gguf("smollm2-135m-instruct")
    folder = tmp_path_factory.mktemp("gguf")
    (folder / gguf_file.name).symlink_to(gguf_file)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_equals_transformers_gguf_tokenizer_and_decodes_back(ours, from_gguf, from_dir, text):
    ids = ours.encode(text)
    assert ids == from_gguf.encode(text, add_special_tokens=False)
    assert ids == from_dir.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text


def test_digits_are_single_tokens_and_special_tokens_whole(ours):
    # SmolLM2 was trained with every digit split off ("smollm" pre-tokenizer); no id spans two digits.
    ids = ours.encode("x 31415926")
    assert [ours.decode([i]) for i in ids] == ["x", " ", "3", "1", "4", "1", "5", "9", "2", "6"]
    assert ours.encode("<|im_start|>user") == [1, 4093]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 2, 49152)
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_equals_transformers(ours, from_dir, add_generation_prompt):
    theirs = from_dir
    for messages in (CONVERSATION, [{"role": "system", "content": "Be brief."}] + CONVERSATION[:1]):
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == theirs.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        assert ours.encode(text) == theirs.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 5 and ours.encode(text).count(1) == 5


def test_template_helpers_behave_like_transformers():
    template = compile_chat_template(
        "{% if messages|length == 0 %}{{ raise_exception('need a message') }}{% endif %}"
        "{% for m in messages %}{{ m|tojson }}{% endfor %}")
    assert template.render(messages=[{"content": "<b>\"é\"</b>"}]) == '{"content": "<b>\\"é\\"</b>"}'
    with pytest.raises(TemplateError, match="need a message"):
        template.render(messages=[])


def test_missing_tokenizer_and_template_errors(tmp_path, smol_dir):
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((smol_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hello world") == load_tokenizer(smol_dir).encode("hello world")
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template(CONVERSATION)
