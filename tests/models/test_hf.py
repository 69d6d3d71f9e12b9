"""HF safetensors checkpoints <-> our Transformer, against tiny random models built with transformers."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from aligner.models import attach_value_head, from_pretrained, has_value_head  # noqa: E402
from aligner.models.hf import CheckpointReader, load_config, parse_size, save_hf_checkpoint  # noqa: E402

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

FAMILIES = {
    "llama3-rope-untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "mistral-window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(tie_word_embeddings=False, sliding_window=6)),
    "qwen2-bias-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3-qknorm-untied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                            dict(tie_word_embeddings=False, head_dim=24)),
}


def make_hf_model(family: str, seed: int = 0):
    """A tiny HF model with every parameter random (biases and norm weights too, so they are tested)."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SIZES, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def padded_batch(seed: int = 1):
    """Two rows: 14 real tokens, and 9 real tokens left-padded to 14; positions skip the padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 14), generator=g)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return tokens, mask, positions


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("shard", [False, True])
def test_load_matches_transformers_logits(tmp_path, family, shard):
    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    ours = from_pretrained(tmp_path).eval()
    tokens, mask, positions = padded_batch()
    with torch.no_grad():
        ref = hf(tokens).logits
        out = ours(tokens)
        ref_pad = hf(tokens, attention_mask=mask, position_ids=positions).logits
        out_pad = ours(tokens, attention_mask=mask, position_ids=positions)
    assert out.shape == (2, 14, SIZES["vocab_size"])
    assert rel_err(out, ref) < 1e-5
    real = mask.bool()
    assert rel_err(out_pad[real], ref_pad[real]) < 1e-5


@pytest.mark.parametrize("family", ["llama3-rope-untied", "qwen2-bias-tied", "qwen3-qknorm-untied"])
def test_export_reloads_in_transformers_with_same_logits(tmp_path, family):
    hf = make_hf_model(family, seed=3)
    hf.save_pretrained(tmp_path / "src")
    ours = from_pretrained(tmp_path / "src").eval()
    out_dir = save_hf_checkpoint(ours, None, tmp_path / "export", max_shard_size="30KB")
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert ("lm_head.weight" in index["weight_map"]) == (not ours.config.tie_word_embeddings)
    assert not list(tmp_path.glob(".export.tmp-*"))  # the temporary sibling is gone
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    tokens, mask, positions = padded_batch(seed=4)
    with torch.no_grad():
        ref = ours(tokens, attention_mask=mask, position_ids=positions)
        out = reloaded(tokens, attention_mask=mask, position_ids=positions).logits
        ours_again = from_pretrained(out_dir)(tokens, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    assert rel_err(out[real], ref[real]) < 1e-5
    assert torch.equal(ours_again, ref)


def test_bfloat16_export_and_load(tmp_path):
    hf = make_hf_model("llama-tied", seed=5)
    hf.save_pretrained(tmp_path / "src")
    ours = from_pretrained(tmp_path / "src", dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.rope_inv_freq.dtype == torch.float32
    assert ours.output.weight is ours.tok_embeddings.weight  # tied after to_empty
    save_hf_checkpoint(ours, ours.config, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    ref = hf.state_dict()["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    assert torch.equal(weights["model.layers.1.mlp.up_proj.weight"], ref)


def test_reader_slices_equal_full_tensor_slices(tmp_path):
    hf = make_hf_model("llama-tied", seed=6)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    reader = CheckpointReader(tmp_path)
    names = reader.names()
    assert "output.weight" in names and "layers.1.self_attn.q_proj.weight" in names
    assert len(names) == len(set(hf.state_dict()) | {"lm_head.weight"})
    full = reader.read("layers.1.self_attn.q_proj.weight")
    assert torch.equal(full, hf.state_dict()["model.layers.1.self_attn.q_proj.weight"])
    assert reader.shape("layers.1.self_attn.q_proj.weight") == (64, 64)
    rows = reader.read("layers.1.self_attn.q_proj.weight", index=(slice(16, 48), slice(None)))
    cols = reader.read("layers.1.self_attn.q_proj.weight", index=(slice(None), slice(32, 64)))
    assert torch.equal(rows, full[16:48]) and torch.equal(cols, full[:, 32:64])
    # Tied: the LM head reads the embedding, sliced by vocabulary rows as a vocab-parallel rank would.
    assert torch.equal(reader.read("output.weight", index=(slice(48, 96),)),
                       reader.read("tok_embeddings.weight")[48:96])
    assert reader.read("norm.weight", dtype="bfloat16").dtype == torch.bfloat16


def test_value_head_round_trip(tmp_path):
    make_hf_model("qwen2-bias-tied", seed=7).save_pretrained(tmp_path / "src")
    critic = attach_value_head(from_pretrained(tmp_path / "src"), std=0.5)
    save_hf_checkpoint(critic, critic.config, tmp_path / "critic")
    head = load_file(tmp_path / "critic" / "value_head.safetensors")
    assert set(head) == {"weight", "bias"} and head["weight"].shape == (1, 64)
    with safe_open(tmp_path / "critic" / "model.safetensors", framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("lm_head")]
    loaded = from_pretrained(tmp_path / "critic")
    assert has_value_head(loaded)
    tokens = padded_batch()[0]
    with torch.no_grad():
        assert torch.equal(loaded(tokens), critic(tokens))
    assert loaded(tokens).shape == (2, 14, 1)


def test_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does_not_exist does not exist.*fetch-model"):
        from_pretrained(tmp_path / "does_not_exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.json not found"):
        load_config(tmp_path / "empty")
    make_hf_model("llama-tied").save_pretrained(tmp_path / "m")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no weights in .*noweights: neither model.safetensors"):
        from_pretrained(tmp_path / "noweights")
    with pytest.raises(KeyError, match=r"'layers.9.mlp.up_proj.weight' is not in the checkpoint"):
        CheckpointReader(tmp_path / "m").read("layers.9.mlp.up_proj.weight")
    # An extra tensor with no counterpart, and a missing one, are both named.
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing from the checkpoint: layers.1.mlp.down_proj.weight.*"
                                         r"not in the model: model.layers.0.mlp.extra_proj.weight"):
        from_pretrained(tmp_path / "m")


def test_export_never_replaces_a_full_directory_silently(tmp_path):
    model = from_pretrained(_saved(tmp_path / "src"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="out already exists"):
        save_hf_checkpoint(model, None, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists() and not list(tmp_path.glob(".out.*"))
    save_hf_checkpoint(model, None, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123


def _saved(path):
    make_hf_model("llama-tied", seed=8).save_pretrained(path)
    return path
