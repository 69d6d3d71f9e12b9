"""The real model: SmolLM2-135M-Instruct converted from its GGUF file, against transformers.

The converted directory lives in the default cache (``$ALIGNER_CACHE`` or ``~/.cache/aligner``) so
only the first run downloads. A second part checks the GGUF conversion of Qwen2/Qwen3 files on tiny
random models, against transformers' own GGUF loader.
"""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from aligner.cli import main as cli_main  # noqa: E402
from aligner.models import from_pretrained  # noqa: E402
from aligner.models.fetch import fetch_gguf, fetch_model, smollm2_path  # noqa: E402
from aligner.models.args import TransformerConfig  # noqa: E402
from aligner.models.gguf import (GGUF_TO_HF, convert_gguf, llama3_rope_scaling_from_factors,  # noqa: E402
                                 unpermute_rotary_rows)
from aligner.models.hf import load_config, save_hf_checkpoint  # noqa: E402
from aligner.models.tokenizer import load_tokenizer  # noqa: E402
from aligner.models.transformer import rope_inv_freq  # noqa: E402

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Name a colour of the sky at 12:00."}],
]


@pytest.fixture(scope="module")
def smol_dir():
    return smollm2_path()


@pytest.fixture(scope="module")
def ours(smol_dir):
    return from_pretrained(smol_dir).eval()


@pytest.fixture(scope="module")
def reference(smol_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(smol_dir):
    """Two chat prompts, left-padded into one batch: tokens, attention mask, positions, lengths."""
    tok = load_tokenizer(smol_dir)
    rows = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True)) for c in CONVERSATIONS]
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), tok.pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return tokens, mask, (mask.cumsum(-1) - 1).clamp(min=0), [len(r) for r in rows]


def rel_err(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_converted_config_is_smollm2(smol_dir, capsys):
    cfg = load_config(smol_dir)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert fetch_model("smollm2-135m-instruct") == smol_dir  # cached: no second download
    assert cli_main(["fetch-model", "smollm2-135m-instruct"]) == 0
    assert capsys.readouterr().out.strip() == str(smol_dir)
    with pytest.raises(ValueError, match="unknown model 'gpt-5'; known models: smollm2-135m-instruct"):
        fetch_model("gpt-5")


def test_logits_equal_transformers(ours, reference, batch):
    tokens, mask, positions, lengths = batch
    with torch.no_grad():
        ref = reference(tokens, attention_mask=mask, position_ids=positions).logits
        out = ours(tokens, attention_mask=mask, position_ids=positions)
        single_ref = reference(tokens[1:, -lengths[1]:]).logits
        single = ours(tokens[1:, -lengths[1]:])
    real = mask.bool()
    assert rel_err(out[real], ref[real]) < 1e-5
    assert rel_err(single, single_ref) < 1e-5
    # The padded row's real tokens give the same logits as the row alone.
    assert rel_err(out[1, -lengths[1]:], single[0]) < 1e-5


def test_export_reloads_in_transformers(ours, smol_dir, batch, tmp_path):
    out_dir = save_hf_checkpoint(ours, None, tmp_path / "export", max_shard_size="200MB", tokenizer_dir=smol_dir)
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and "lm_head.weight" not in index["weight_map"]
    assert (out_dir / "tokenizer.json").read_bytes() == (smol_dir / "tokenizer.json").read_bytes()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    tokens, mask, positions, _ = batch
    with torch.no_grad():
        ref = ours(tokens, attention_mask=mask, position_ids=positions)
        out = reloaded(tokens, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert rel_err(out[real], ref[real]) < 1e-5


def test_unpermuted_weights_equal_transformers_gguf_loader(ours, tmp_path):
    """transformers un-permutes llama q/k on its own; every weight must agree with ours."""
    gguf_file = fetch_gguf("smollm2-135m-instruct")
    (tmp_path / gguf_file.name).symlink_to(gguf_file)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name,
                                                               dtype=torch.float32).state_dict()
    mine = {n: p for n, p in ours.state_dict().items() if n != "output.weight"}
    hf_names = {n: "model." + n.replace("tok_embeddings", "embed_tokens") if n != "output.weight" else "lm_head.weight"
                for n in mine}
    for name, tensor in mine.items():
        assert (tensor - theirs[hf_names[name]]).abs().max().item() < 1e-6, name
    # And the permutation really mattered: the raw (still permuted) q rows differ from the result.
    q = ours.layers["0"].self_attn.q_proj.weight
    permuted = q.reshape(9, 2, 32, 576).transpose(1, 2).reshape(576, 576)  # what llama.cpp stores
    assert torch.equal(unpermute_rotary_rows(permuted, 9), q) and not torch.equal(permuted, q)


def test_cli_convert_writes_the_same_weights(smol_dir, tmp_path, capsys):
    assert cli_main(["convert", str(fetch_gguf("smollm2-135m-instruct")), str(tmp_path / "conv")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "conv")
    assert (tmp_path / "conv" / "model.safetensors").read_bytes() == (smol_dir / "model.safetensors").read_bytes()
    assert cli_main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 1
    assert "missing.gguf does not exist" in capsys.readouterr().err


# --- Qwen2 (qkv bias) and Qwen3 (q/k norm) GGUF files, written here from tiny random HF models ---

_HF_TO_GGUF = {hf: g for g, hf in GGUF_TO_HF.items()}


def _byte_vocab():
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<|endoftext|>"] + sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    return tokens, merges


def write_tiny_gguf(path, arch: str, hf_model) -> None:
    """A float32 GGUF file of ``hf_model`` with the metadata keys llama.cpp writes for ``arch``."""
    c = hf_model.config
    tokens, merges = _byte_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        key = name.replace(f".{layer}.", ".{i}.", 1) if layer is not None else name
        w.add_tensor(_HF_TO_GGUF[key].format(i=layer), t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_tiny_qwen_gguf_conversion_matches_transformers_gguf_loader(tmp_path, arch):
    config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    model_cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[arch]
    vocab = len(_byte_vocab()[0])
    torch.manual_seed(0)
    hf = model_cls(config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                              tie_word_embeddings=arch == "qwen2")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    (tmp_path / "g").mkdir()
    write_tiny_gguf(tmp_path / "g" / "tiny.gguf", arch, hf)
    out = convert_gguf(tmp_path / "g" / "tiny.gguf", tmp_path / "hf")
    cfg = load_config(out)
    assert (cfg.model_type, cfg.attention_bias, cfg.qk_norm) == (arch, arch == "qwen2", arch == "qwen3")
    assert cfg.tie_word_embeddings == (arch == "qwen2")
    # transformers' GGUF loader ignores attention.key_length (Qwen3's head_dim), so it is passed here.
    override = {"head_dim": 16} if arch == "qwen3" else {}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="tiny.gguf", **override,
                                                               dtype=torch.float32).eval()
    ours = from_pretrained(out).eval()
    tokens = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, orig, mine = theirs(tokens).logits, hf(tokens).logits, ours(tokens)
    assert rel_err(mine, ref) < 1e-5 and rel_err(mine, orig) < 1e-5
    tok = load_tokenizer(out)
    ids = tok.tokenizer.token_to_id
    assert tok.encode("the<|endoftext|> the") == [ids("t"), ids("he"), 0, ids("Ġthe")]


def test_llama3_rope_factors_tensor_becomes_rope_scaling():
    """Llama 3.1 GGUFs store rope scaling as per-frequency divisors (rope_freqs.weight); we recover it."""
    sizes = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)
    truth = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
    factors = rope_inv_freq(TransformerConfig(**sizes)) / rope_inv_freq(TransformerConfig(**sizes, rope_scaling=truth))
    assert factors.min().item() == pytest.approx(1.0) and factors.max().item() == pytest.approx(8.0)
    assert llama3_rope_scaling_from_factors(factors, sizes, "x.gguf") == pytest.approx(truth)
    with pytest.raises(ValueError, match="x.gguf: tensor rope_freqs.weight holds rope factors that match no llama3"):
        llama3_rope_scaling_from_factors(factors.flip(0), sizes, "x.gguf")
