"""export_hf: a training checkpoint -> a Hugging Face directory that transformers loads with the same logits."""
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from aligner.checkpoint import MODEL_CONFIG_FILE, export_hf, save_checkpoint
from aligner.models import attach_value_head, from_pretrained

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "workers"))
import ckpt_train_state as ts  # noqa: E402

FAMILIES = {
    "llama": {},
    "qwen2_bias_tied": {"model_type": "qwen2", "attention_bias": True, "tie_word_embeddings": True},
    "qwen3_qknorm": {"model_type": "qwen3", "qk_norm": True},
}


def trained_checkpoint(out: Path, policy: bool = False, value_head: bool = False, **overrides):
    """A tiny model after one AdamW step (biases and norms no longer at their init), saved at step 1."""
    model = tiny_model(seed=3, **overrides)
    if value_head:
        attach_value_head(model)
    optimizer, scheduler = ts.build_optimizer(model)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model(tokens).square().mean().backward()
    optimizer.step()
    state = {"policy": ts.PolicyState(model, optimizer, scheduler)} if policy else ts.app_state(model, optimizer, scheduler)
    return model.eval(), save_checkpoint(out, 1, state, {}, keep_last=1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, family):
    model, ckpt = trained_checkpoint(tmp_path / "run", **FAMILIES[family])
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens)
        got = reloaded(tokens).logits
    assert (got - want).abs().max().item() < 1e-5


def test_export_of_a_wrapper_state_finds_the_model_prefix(tmp_path):
    model, ckpt = trained_checkpoint(tmp_path / "run", policy=True)
    want = model.state_dict()
    # Keys are policy.model.*: found on their own (the only model), or named with key_prefix.
    for out, kwargs in ((tmp_path / "auto", {}), (tmp_path / "named", {"key_prefix": "policy.model"})):
        exported = from_pretrained(export_hf(ckpt, out, **kwargs)).state_dict()
        assert all(torch.equal(exported[n], w) for n, w in want.items())
    with pytest.raises(KeyError, match="no model tensors under 'critic.model.'.*found: policy.model"):
        export_hf(ckpt, tmp_path / "bad", key_prefix="critic.model")


def test_export_dtype_value_head_and_output_dir(tmp_path):
    model, _ = trained_checkpoint(tmp_path / "run", value_head=True)
    # The run's output directory exports its latest checkpoint.
    hf_dir = export_hf(tmp_path / "run", tmp_path / "hf", dtype="bfloat16")
    assert json.loads((hf_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (hf_dir / "value_head.safetensors").is_file()
    exported = from_pretrained(hf_dir, dtype="bfloat16").state_dict()
    for name, w in model.state_dict().items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], w.to(torch.bfloat16)), name


def test_export_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"aligner export-hf: {tmp_path / 'missing'} does not exist"):
        export_hf(tmp_path / "missing", tmp_path / "hf")
    _, ckpt = trained_checkpoint(tmp_path / "run")
    (ckpt / MODEL_CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{ckpt / MODEL_CONFIG_FILE} not found.*config="):
        export_hf(ckpt, tmp_path / "hf")
    with pytest.raises(ValueError, match="has shape"):
        export_hf(ckpt, tmp_path / "hf", config=tiny_model(hidden_size=128).config)
