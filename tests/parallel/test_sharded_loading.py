"""Each rank reads only its own shards from an HF checkpoint: memory near the shard, values exact."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_torchrun, tiny_config, tiny_model
from safetensors import safe_open

from aligner.models import Transformer, TransformerConfig, attach_value_head
from aligner.models.hf import CheckpointReader, from_pretrained, save_hf_checkpoint
from aligner.parallel import build_parallel_model, seeded_init_

WORKER = Path(__file__).parent / "workers" / "load_sharded.py"
# ~250M parameters, ~500 MB in bf16: big enough that holding it whole is plain in a process's RSS.
BIG = TransformerConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                        num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)


def write_big_checkpoint(out: Path) -> int:
    """Random bf16 weights with our names, saved as a sharded HF checkpoint; returns its byte size."""
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in Transformer(BIG).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=gen, dtype=torch.bfloat16) for n, s in shapes.items()}
    save_hf_checkpoint(state, BIG, out, dtype="bfloat16", max_shard_size="200MB")
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_loading")
    ckpt_bytes = write_big_checkpoint(root / "big")
    save_hf_checkpoint(tiny_model(seed=1, attention_bias=True, model_type="qwen2"), None, root / "tiny")
    save_hf_checkpoint(tiny_model(seed=2, tie_word_embeddings=True), None, root / "tiny_tied")
    save_hf_checkpoint(attach_value_head(tiny_model(seed=3)), None, root / "tiny_value")
    out = root / "out"
    out.mkdir()
    run_torchrun(WORKER, 2, *(str(root / name) for name in ("big", "tiny", "tiny_tied", "tiny_value", "out")))
    stats = [json.loads((out / f"stats_rank{r}.json").read_text()) for r in range(2)]
    yield {"root": root, "out": out, "ckpt_bytes": ckpt_bytes, "stats": stats}
    shutil.rmtree(root, ignore_errors=True)  # ~1 GB of checkpoints that nothing reads after this module


def test_checkpoint_is_about_250m_params_and_sharded(loaded):
    assert 240e6 < BIG.num_params < 260e6
    assert (loaded["root"] / "big" / "model.safetensors.index.json").is_file()


def test_peak_memory_stays_near_the_shard(loaded):
    full = loaded["ckpt_bytes"]
    for s in loaded["stats"]:
        increase = (s["peak_kib"] - s["baseline_kib"]) * 1024
        # The rank's parameters are half the model; holding the whole would be >= 1.0 x.
        assert 0.45 * full < s["local_param_bytes"] < 0.55 * full
        assert increase < 0.75 * full, f"rank {s['rank']}: peak +{increase / 2**20:.0f} MiB of {full / 2**20:.0f} MiB"
        assert increase > 0.45 * full  # the measurement sees the shard itself


def test_loaded_shards_equal_checkpoint_slices(loaded):
    reader = CheckpointReader(loaded["root"] / "big")
    index = json.loads((loaded["root"] / "big" / "model.safetensors.index.json").read_text())["weight_map"]
    covered = {}
    for rank in range(2):
        shards = torch.load(loaded["out"] / f"shards_rank{rank}.pt", weights_only=True)
        assert set(shards) == set(reader.names())
        for name, (bounds, local) in shards.items():
            hf_name = reader.hf_name(name)
            with safe_open(loaded["root"] / "big" / index[hf_name], framework="pt") as f:
                full = f.get_tensor(hf_name)
            sl = tuple(slice(a, b) for a, b in bounds)
            assert local.dtype == torch.bfloat16
            assert torch.equal(local, full[sl]), (rank, name, bounds)
            covered[name] = covered.get(name, 0) + local.numel()
            if rank == 1 and name.endswith(("q_proj.weight", "o_proj.weight")):
                # colwise shards rows, rowwise shards columns: the two ranks hold different halves
                dim = 0 if "q_proj" in name else 1
                assert tuple(bounds[dim]) == (full.shape[dim] // 2, full.shape[dim])
    # Every element of every sharded tensor is held by some rank (norms are replicated on both).
    for name in reader.names():
        numel = torch.Size(reader.shape(name)).numel()
        assert covered[name] == (2 * numel if "norm" in name else numel), name


@pytest.mark.parametrize("case,ckpt", [("tiny_tp", "tiny"), ("tiny_tied_fsdp", "tiny_tied"), ("tiny_tied_tp", "tiny_tied"),
                                       ("tiny_value_tp", "tiny_value")])
def test_parallel_load_gives_single_process_logits(loaded, case, ckpt):
    logits = torch.load(loaded["out"] / "tiny_logits.pt", weights_only=True)[case]
    model = from_pretrained(loaded["root"] / ckpt)
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(tokens)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)


def test_seeded_init_is_the_same_for_any_stage_cut():
    """Per-name seeding: a pipeline stage gets the same values as the full model; the last stage of a
    tied model draws its head from the embedding's name."""
    full = seeded_init_(Transformer(tiny_config(tie_word_embeddings=True)), seed=7)
    last = Transformer(tiny_config(tie_word_embeddings=True))
    for key in ("0", "1"):
        del last.layers[key]
    last.tok_embeddings = None
    seeded_init_(last, seed=7)
    stage = dict(last.named_parameters())
    assert set(stage) == {n for n, _ in full.named_parameters() if not n.startswith(("layers.0.", "layers.1.",
                                                                                     "tok_embeddings."))} | {"output.weight"}
    for name, p in full.named_parameters():
        if name in stage:
            assert torch.equal(stage[name], p), name
    assert torch.equal(stage["output.weight"], full.tok_embeddings.weight)
    assert full.layers["0"].input_layernorm.weight.eq(1).all() and full.layers["0"].mlp.up_proj.weight.std() > 0.01
    other = seeded_init_(Transformer(tiny_config()), seed=8)
    assert not torch.equal(other.layers["0"].mlp.up_proj.weight, full.layers["0"].mlp.up_proj.weight)


def test_build_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="init='checkpoint' needs a checkpoint directory"):
        build_parallel_model(tiny_config(), None, init="checkpoint")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_parallel_model(tmp_path / "missing", None)
