"""The model's own behaviours on tiny random weights: packing, padding, KV cache, heads, configs."""
import math

import pytest
import torch
from helpers import tiny_config, tiny_model

from aligner.models import Transformer, TransformerConfig, attach_value_head, config_from_hf, has_value_head
from aligner.models.kv_cache import attach_kv_caches, detach_kv_caches
from aligner.models.transformer import build_attention_mask, default_position_ids, rope_inv_freq


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"attention_bias": True},
                                       {"tie_word_embeddings": True}])
def test_packed_forward_equals_each_document_alone(overrides):
    model = tiny_model(seed=1, **overrides).eval()
    torch.manual_seed(0)
    lengths = [5, 9, 2, 8]  # two rows of 14 tokens: documents 5+9 and 2+8 (+4 of a third)
    docs = [torch.randint(0, 128, (n,)) for n in lengths]
    tokens = torch.stack([torch.cat(docs[0:2]), torch.cat([docs[2], docs[3], torch.zeros(4, dtype=torch.long)])])
    document_ids = torch.tensor([[0] * 5 + [1] * 9, [0] * 2 + [1] * 8 + [2] * 4])
    with torch.no_grad():
        packed = model(tokens, document_ids=document_ids)
        alone = [model(d[None])[0] for d in docs]
    assert (packed[0, :5] - alone[0]).abs().max().item() < 1e-5
    assert (packed[0, 5:] - alone[1]).abs().max().item() < 1e-5
    assert (packed[1, :2] - alone[2]).abs().max().item() < 1e-5
    assert (packed[1, 2:10] - alone[3]).abs().max().item() < 1e-5


def test_position_ids_restart_per_document_and_skip_left_padding():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert default_position_ids(doc, document_ids=doc).tolist() == [[0, 1, 2, 0, 1, 0]]
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert default_position_ids(am, attention_mask=am).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_padded_batch_equals_unpadded_rows():
    model = tiny_model(seed=2).eval()
    torch.manual_seed(1)
    a, b = torch.randint(0, 128, (7,)), torch.randint(0, 128, (4,))
    left = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    left_mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    right = torch.stack([a, torch.cat([b, torch.zeros(3, dtype=torch.long)])])
    right_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        ref_a, ref_b = model(a[None])[0], model(b[None])[0]
        out_l = model(left, attention_mask=left_mask)
        out_r = model(right, attention_mask=right_mask)
    assert (out_l[0] - ref_a).abs().max().item() < 1e-5
    assert (out_l[1, 3:] - ref_b).abs().max().item() < 1e-5
    assert (out_r[1, :4] - ref_b).abs().max().item() < 1e-5
    assert torch.isfinite(out_l).all()  # padded query rows keep their diagonal, so no NaN


def test_attention_mask_shape_and_content():
    am = torch.tensor([[0, 1, 1]])
    mask = build_attention_mask(1, 3, torch.device("cpu"), attention_mask=am)
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert build_attention_mask(2, 5, torch.device("cpu")) is None  # plain causal: SDPA's is_causal
    window = build_attention_mask(1, 4, torch.device("cpu"), sliding_window=2)
    assert window[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"tie_word_embeddings": True}])
def test_branches_after_a_shared_prefix_equal_each_sequence_alone(overrides):
    """[prefix | a | b] with branch_ids 0/1/2: branch b sees the prefix but not a, and its positions (derived
    from the mask when not given) continue the prefix, so its logits are those of prefix + b alone."""
    model = tiny_model(seed=3, **overrides).eval()
    torch.manual_seed(2)
    prefix, a, b = (torch.randint(0, 128, (n,)) for n in (6, 5, 3))
    row = torch.cat([prefix, a, b, torch.zeros(2, dtype=torch.long)])[None]  # 2 tokens of right padding
    branch_ids = torch.tensor([[0] * 6 + [1] * 5 + [2] * 3 + [0] * 2])
    attention_mask = torch.tensor([[1] * 14 + [0] * 2])
    explicit = torch.tensor([list(range(11)) + list(range(6, 9)) + [0, 0]])
    with torch.no_grad():
        shared = model(row, branch_ids=branch_ids, attention_mask=attention_mask)
        given = model(row, branch_ids=branch_ids, attention_mask=attention_mask, position_ids=explicit)
        with_a, with_b = model(torch.cat([prefix, a])[None])[0], model(torch.cat([prefix, b])[None])[0]
    assert (shared[0, :11] - with_a).abs().max().item() < 1e-5
    assert (shared[0, 11:14] - with_b[6:]).abs().max().item() < 1e-5
    assert (given[0, :14] - shared[0, :14]).abs().max().item() == 0.0
    mask = build_attention_mask(1, 16, torch.device("cpu"), attention_mask, branch_ids=branch_ids)[0, 0]
    assert mask[12].int().tolist() == [1] * 6 + [0] * 5 + [1] * 2 + [0] * 3  # b's 2nd token: prefix and b so far
    assert (mask[:14].sum(-1) - 1).tolist() == explicit[0, :14].tolist()


def test_logit_positions_give_the_full_logits_at_those_positions():
    model = tiny_model(seed=4).eval()
    torch.manual_seed(3)
    tokens = torch.randint(0, 128, (2, 9))
    positions = torch.tensor([[2, 3, 8], [0, 5, 5]])  # any positions, repeats allowed
    with torch.no_grad():
        full = model(tokens)
        some = model(tokens, logit_positions=positions)
    assert some.shape == (2, 3, 128)
    assert (some - full.gather(1, positions[..., None].expand(-1, -1, 128))).abs().max().item() < 1e-5


def test_kv_cache_incremental_decoding_equals_full_forward():
    model = tiny_model(seed=3).eval()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        S = 16
        attach_kv_caches(model, batch=2, max_len=S)
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
        steps = [model(tokens[:, :8], mask=causal[None, None, :8].expand(2, 1, 8, S), input_pos=torch.arange(8))]
        for t in range(8, 12):
            steps.append(model(tokens[:, t:t + 1], position_ids=torch.full((2, 1), t),
                               mask=causal[None, None, t:t + 1].expand(2, 1, 1, S), input_pos=torch.tensor([t])))
        detach_kv_caches(model)
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    assert all(layer.self_attn.kv_cache is None for layer in model.layers.values())


def test_kv_cache_holds_only_kv_heads():
    model = tiny_model(seed=0)
    attach_kv_caches(model, batch=3, max_len=10)
    assert model.layers["0"].self_attn.kv_cache.k.shape == (3, 2, 10, 16)


def test_value_head_outputs_one_scalar_per_token():
    model = attach_value_head(tiny_model(seed=4))
    assert has_value_head(model)
    out = model(torch.randint(0, 128, (2, 5)))
    assert out.shape == (2, 5, 1)
    assert model.output.bias.abs().sum().item() == 0.0
    # init scale 1/sqrt(D+1): the sample std of 64 weights is near 1/sqrt(65) ~ 0.124
    assert 0.07 < model.output.weight.std().item() < 0.18


def test_tied_embeddings_share_one_tensor():
    model = tiny_model(tie_word_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    n = sum(p.numel() for p in model.parameters())
    assert n == model.config.num_params


def test_num_params_matches_module_count_for_untied_qwen_style():
    model = Transformer(tiny_config(attention_bias=True, qk_norm=True))
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params


def test_llama3_rope_scaling_frequencies():
    cfg = tiny_config(rope_theta=500000.0, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    scaled = rope_inv_freq(cfg)
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4  # short wavelengths: untouched
    low = wavelen > 8192 / 1  # long wavelengths: divided by the factor
    assert torch.equal(scaled[high], plain[high])
    assert torch.allclose(scaled[low], plain[low] / 8.0)
    mid = ~high & ~low
    assert mid.any() and ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8.0)).all()


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        config_from_hf({"model_type": "gpt2"}, source="x/config.json")
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads=3"):
        TransformerConfig(num_attention_heads=4, num_key_value_heads=3, hidden_size=64)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4}})


def test_qwen2_ignores_sliding_window_unless_enabled():
    cfg = config_from_hf({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False,
                          "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert cfg.sliding_window is None and cfg.attention_bias


@pytest.mark.parametrize("n_heads, n_kv", [(9, 3), (4, 4), (8, 1)])
def test_single_query_attention_equals_sdpa(n_heads, n_kv):
    """A decode step's attention as two matmuls (query heads of a group stacked) equals SDPA with GQA, with a
    boolean mask, an additive one and none."""
    import torch.nn.functional as F

    from aligner.models.transformer import single_query_attention

    g = torch.Generator().manual_seed(0)
    B, S, D = 3, 11, 16
    q, k, v = torch.randn(B, n_heads, 1, D, generator=g), torch.randn(B, n_kv, S, D, generator=g), torch.randn(
        B, n_kv, S, D, generator=g)
    lengths = torch.tensor([1, 6, 11])  # keys each row may see; row 0 sees only its first
    keep = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    for mask in (keep, additive, None):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=n_heads != n_kv)
        got = single_query_attention(q, k, v, mask, 0.25)
        assert got.shape == (B, n_heads, 1, D)
        assert (got - want).abs().max().item() < 1e-5
    # Row 0 attends to one key: its output is that key's value, for every head of the group.
    got = single_query_attention(q, k, v, keep, 0.25)
    assert torch.allclose(got[0, :, 0], v[0, torch.arange(n_heads) // (n_heads // n_kv), 0], atol=1e-6)


def test_vocab_projection_in_slices_equals_one_product():
    """A few tokens through a large head run in vocabulary slices; values, shapes, bias and gradient are those
    of one ``F.linear``; many tokens take the one product."""
    import torch.nn.functional as F

    from aligner.models.transformer import HEAD_SLICE_ROWS, LMHead, vocab_projection

    g = torch.Generator().manual_seed(0)
    V, D = 3 * HEAD_SLICE_ROWS + 5, 32  # an uneven last slice
    weight, bias = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    for h in (torch.randn(16, D, generator=g), torch.randn(4, 1, D, generator=g), torch.randn(200, D, generator=g)):
        for b in (None, bias):
            got, want = vocab_projection(h, weight, b), F.linear(h, weight, b)
            assert got.shape == want.shape == (*h.shape[:-1], V)
            assert (got - want).abs().max().item() < 1e-5
    w = weight.clone().requires_grad_()
    h = torch.randn(16, D, generator=g)
    vocab_projection(h, w).pow(2).sum().backward()
    grad = w.grad.clone()
    w.grad = None
    F.linear(h, w).pow(2).sum().backward()
    assert (grad - w.grad).abs().max().item() < 1e-3 * w.grad.abs().max().item()
    head = LMHead(D, V, bias=False)
    assert isinstance(head, torch.nn.Linear) and list(head.state_dict()) == ["weight"]
    model = tiny_model(seed=1, tie_word_embeddings=True)
    assert isinstance(model.output, LMHead) and model.output.weight is model.tok_embeddings.weight
