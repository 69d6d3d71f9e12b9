"""Activation checkpointing recomputes blocks in backward and changes neither the loss nor any gradient."""
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from aligner.parallel import apply_activation_checkpointing


def loss_grads_and_mlp_calls(mode: str, every_n: int = 1):
    model = tiny_model(seed=3, qk_norm=True)
    names_before = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, mode, every_n)
    assert [n for n, _ in model.named_parameters()] == names_before  # no wrapper module, same names
    calls = {key: 0 for key in model.layers}
    for key, block in model.layers.items():
        block.mlp.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 12), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    logits = model(tokens, attention_mask=mask)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, calls


@pytest.mark.parametrize("mode,every_n,recomputed", [
    ("full", 1, {"0", "1", "2", "3"}),
    ("selective", 2, {"0", "2"}),
    ("selective", 3, {"0", "3"}),
])
def test_checkpointing_keeps_loss_and_grads(mode, every_n, recomputed):
    loss0, grads0, calls0 = loss_grads_and_mlp_calls("none")
    loss, grads, calls = loss_grads_and_mlp_calls(mode, every_n)
    assert loss == loss0
    for name, g in grads0.items():
        assert torch.equal(grads[name], g), name  # the recompute is bit-identical on CPU
    assert set(calls0.values()) == {1}
    # A checkpointed block enters its MLP twice (forward + recompute in backward; the recompute stops
    # early once the last saved tensor is rebuilt, so a pre-hook, not a post-hook, sees it).
    assert {k for k, n in calls.items() if n == 2} == recomputed
    assert {k for k, n in calls.items() if n == 1} == set(calls0) - recomputed


def test_applying_twice_checkpoints_once():
    model = tiny_model()
    apply_activation_checkpointing(model, "full")
    apply_activation_checkpointing(model, "full")
    calls = []
    model.layers["0"].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    assert len(calls) == 2


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode 'partial' is not one of none, full, selective"):
        apply_activation_checkpointing(tiny_model(), "partial")
