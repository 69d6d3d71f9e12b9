"""Gradient accumulation fused into a tied embedding and LM head: the same gradients and training as
autograd's, used only where the pair is one plain tensor, and no change to passes without gradients."""
import pytest
import torch
import torch.nn.functional as F
from policy_common import full_weights, job_config, run_steps

from aligner.config import architecture_dict
from aligner.models import Transformer, config_from_hf
from aligner.models.heads import attach_value_head
from aligner.parallel import seeded_init_
from aligner.wrappers import PolicyModel
from aligner.wrappers.embedding_grad import fuse_tied_gradient_accumulation


def _tied_model() -> Transformer:
    model = Transformer(config_from_hf(architecture_dict(job_config(tied=True).model)))
    seeded_init_(model, 7)
    return model


def _grads(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor, passes: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    for _ in range(passes):  # several backward passes accumulate, as micro-batches do
        F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten()).backward()
    return model.tok_embeddings.weight.grad


@pytest.mark.parametrize("passes", [1, 3])
def test_fused_accumulation_gives_autograds_gradients(passes):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (3, 12), generator=gen)
    tokens[0, :4] = 5  # a repeated token: its rows must add up
    labels = torch.randint(0, 128, (3, 12), generator=gen)
    model = _tied_model()
    plain = _grads(model, tokens, labels, passes).clone()
    other = {n: p.grad.clone() for n, p in model.named_parameters() if n != "tok_embeddings.weight"}
    with torch.no_grad():
        logits = model(tokens)
    assert fuse_tied_gradient_accumulation(model)
    fused = _grads(model, tokens, labels, passes)
    assert fused.layout == torch.strided and fused.shape == (128, 64)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-7)
    assert (plain[5] != 0).all() and plain.abs().sum() > 1.0
    for name, p in model.named_parameters():  # the rest of the model is untouched
        if name != "tok_embeddings.weight":
            torch.testing.assert_close(p.grad, other[name], rtol=0, atol=1e-7, msg=name)
    with torch.no_grad():  # passes without gradients run the plain ops: bit for bit
        assert torch.equal(model(tokens), logits)


def test_a_lookup_without_the_head_adds_its_rows():
    model = _tied_model()
    fuse_tied_gradient_accumulation(model)
    ids = torch.tensor([[3, 3, 9]])
    model.tok_embeddings(ids).sum().backward()
    expected = torch.zeros(128, 64)
    expected[3], expected[9] = 2.0, 1.0
    torch.testing.assert_close(model.tok_embeddings.weight.grad, expected, rtol=0, atol=0)


def test_only_a_plain_embedding_tied_to_the_head_is_fused(single_process_mesh):
    untied = Transformer(config_from_hf(architecture_dict(job_config(tied=False).model)))
    assert not fuse_tied_gradient_accumulation(untied)
    value = _tied_model()
    attach_value_head(value)  # the head is no longer the embedding
    assert not fuse_tied_gradient_accumulation(value)
    # FSDP's mixed precision makes every parameter a DTensor, even on one process: autograd's path.
    sharded = PolicyModel(job_config(tied=True, mixed_precision="bfloat16"), single_process_mesh)
    assert sharded.fused_tied_grad == [False]
    assert PolicyModel(job_config(tied=True), single_process_mesh).fused_tied_grad == [True]


def test_policy_training_with_fused_accumulation_equals_autograds(single_process_mesh):
    runs = {}
    for fused in (True, False):
        policy = PolicyModel(job_config(tied=True, micro_batch_size=1), single_process_mesh)
        assert policy.fused_tied_grad == [True]
        if not fused:  # autograd's own accumulation, for comparison
            for module in (policy.model.tok_embeddings, policy.model.output):
                del module.forward
        runs[fused] = dict(metrics=run_steps(policy, steps=2), weights=full_weights(policy))
    for r, g in zip(runs[False]["metrics"], runs[True]["metrics"]):
        assert g == pytest.approx(r, rel=1e-6)
    for name, w in runs[False]["weights"].items():
        torch.testing.assert_close(runs[True]["weights"][name], w, rtol=0, atol=1e-6, msg=name)
