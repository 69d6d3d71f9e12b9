"""PolicyModel in one process: micro-batching does not change the step, which equals plain training on
the whole batch; eval_step, forward, optimizer offload and the state dict."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from policy_common import GLOBAL_BATCH, TokenLoss, full_weights, job_config, make_batch, run_steps

from aligner.interface import Alignable, LossFn
from aligner.models import Transformer, config_from_hf
from aligner.config import architecture_dict
from aligner.parallel import seeded_init_
from aligner.wrappers import PolicyModel, build_optimizer, lr_at
from aligner.wrappers.batching import at_positions, label_positions, pack_rows, packing_pays
from aligner.wrappers.optimizer import optimizer_state_devices


def plain_reference(cfg, steps: int):
    """The same training written out by hand: one forward over the whole batch, token-mean loss, torch's
    clipping, AdamW with the same groups and the same LR at each step."""
    model = Transformer(config_from_hf(architecture_dict(cfg.model)))
    seeded_init_(model, cfg.trainer.seed)
    opt = build_optimizer(model.parameters(), cfg.optim)
    metrics = []
    for step in range(steps):
        batch = make_batch(step)
        logits = model(batch["tokens"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.optim, 4)
        opt.step()
        opt.zero_grad()
        n = (batch["labels"] != -100).sum().item()
        metrics.append({"loss": loss.item(), "nll": loss.item(), "rows": GLOBAL_BATCH / n,
                        "grad_norm": norm.item(), "lr": lr_at(step, cfg.optim, 4)})
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def by_micro_batch(single_process_mesh):
    out = {}
    for mbs in (1, 3, 4):
        policy = PolicyModel(job_config(micro_batch_size=mbs), single_process_mesh)
        out[mbs] = dict(metrics=run_steps(policy, steps=2), weights=full_weights(policy))
    return out


def test_policy_implements_the_interface(single_process_mesh):
    policy = PolicyModel(job_config(), single_process_mesh)
    assert isinstance(policy, Alignable) and isinstance(TokenLoss(), LossFn)
    assert (policy.dp_rank, policy.dp_size) == (0, 1)
    policy.train_step(make_batch(0), TokenLoss())  # step 0 runs at the peak LR without a known length
    before = full_weights(policy)
    with pytest.raises(ValueError, match="set_total_steps"):
        policy.train_step(make_batch(1), TokenLoss())
    assert all(torch.equal(w, before[n]) for n, w in full_weights(policy).items())  # failed before any change


@pytest.mark.parametrize("mbs", [1, 3])
def test_micro_batch_size_does_not_change_the_step(by_micro_batch, mbs):
    """4 rows of lengths 16, 5, 11, 8: micro-batches of 1 (and a ragged 3 + 1) give the step of 4 at once."""
    ref, got = by_micro_batch[4], by_micro_batch[mbs]
    for r, g in zip(ref["metrics"], got["metrics"]):
        assert g == pytest.approx(r, rel=1e-5)
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=0, atol=1e-5, msg=name)


def test_step_equals_plain_training_on_the_whole_batch(by_micro_batch):
    cfg = job_config()
    metrics, weights = plain_reference(cfg, steps=2)
    got = by_micro_batch[1]
    for r, g in zip(metrics, got["metrics"]):
        assert g == pytest.approx(r, rel=1e-5)
    assert got["metrics"][1]["lr"] == pytest.approx(7.5e-4)  # linear decay over 4 steps
    for name, w in weights.items():
        torch.testing.assert_close(got["weights"][name], w, rtol=0, atol=1e-5, msg=name)
    # The normaliser is the global token count, not a mean of per-micro-batch means (which differs here).
    batch = make_batch(0)
    per_row = [F.cross_entropy(_reference_logits(cfg, batch)[i], batch["labels"][i], ignore_index=-100)
               for i in range(GLOBAL_BATCH)]
    assert abs(sum(per_row).item() / GLOBAL_BATCH - got["metrics"][0]["loss"]) > 1e-3


def _reference_logits(cfg, batch):
    model = Transformer(config_from_hf(architecture_dict(cfg.model)))
    seeded_init_(model, cfg.trainer.seed)
    with torch.no_grad():
        return model(batch["tokens"], attention_mask=batch["attention_mask"])


def test_eval_step_and_forward(single_process_mesh):
    cfg = job_config(micro_batch_size=3)
    policy = PolicyModel(cfg, single_process_mesh)
    policy.set_total_steps(4)
    batch = make_batch(0)
    before = full_weights(policy)
    evaluated = policy.eval_step(batch, TokenLoss())
    logprobs = policy.forward(batch, lambda logits, mb: torch.log_softmax(logits, -1).gather(
        -1, mb["tokens"].clamp(min=0)[..., None]).squeeze(-1))
    assert all(torch.equal(w, before[n]) for n, w in full_weights(policy).items())  # nothing trained
    logits = _reference_logits(cfg, batch)
    want = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert set(evaluated) == {"loss", "nll", "rows"}
    assert evaluated["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert evaluated["rows"] == pytest.approx(GLOBAL_BATCH / (batch["labels"] != -100).sum().item())
    assert logprobs.shape == batch["tokens"].shape  # micro-batches of 3 + 1 rows, concatenated
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, batch["tokens"][..., None]).squeeze(-1),
                               rtol=0, atol=1e-5)
    assert policy.train_step(batch, TokenLoss())["loss"] == pytest.approx(evaluated["loss"], rel=1e-6)


def test_forward_micro_batch_size_sets_rows_per_no_grad_forward(single_process_mesh):
    """PPO's local_rollout_forward_batch_size: a no-grad forward of its own micro-batch size gives the same
    numbers as trainer.micro_batch_size, in as many forwards as it says."""
    policy = PolicyModel(job_config(micro_batch_size=3), single_process_mesh)
    batch = make_batch(0)
    seen: list[int] = []

    def logprobs(logits, mb):
        seen.append(logits.shape[0])
        return torch.log_softmax(logits, -1).gather(-1, mb["tokens"].clamp(min=0)[..., None]).squeeze(-1)

    default = policy.forward(batch, logprobs)
    assert seen == [3, 1]  # trainer.micro_batch_size: 3 + 1 rows
    seen.clear()
    one = policy.forward(batch, logprobs, micro_batch_size=1)
    assert seen == [1, 1, 1, 1]
    seen.clear()
    whole = policy.forward(batch, logprobs, micro_batch_size=64)
    assert seen == [4]
    torch.testing.assert_close(one, default, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole, default, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="micro_batch_size=0 must be >= 1"):
        policy.forward(batch, logprobs, micro_batch_size=0)


def test_optimizer_offload_moves_state_and_changes_nothing(single_process_mesh):
    results = {}
    for offload in (False, True):
        policy = PolicyModel(job_config(optimizer_offload=offload), single_process_mesh)
        policy.set_total_steps(4)
        metrics = []
        for step in range(3):
            policy.prepare_for_training()
            assert optimizer_state_devices(policy.optimizer) <= {policy.device.type}
            metrics.append(policy.train_step(make_batch(step), TokenLoss()))
            policy.finish_training()
            if offload:
                assert optimizer_state_devices(policy.optimizer) == {"cpu"}
        results[offload] = metrics, full_weights(policy)
    assert results[True][0] == results[False][0]
    for name, w in results[False][1].items():
        assert torch.equal(results[True][1][name], w), name


def test_state_dict_resumes_bit_for_bit(single_process_mesh):
    cfg = job_config(micro_batch_size=2)
    first = PolicyModel(cfg, single_process_mesh)
    first.set_total_steps(4)
    first.train_step(make_batch(0), TokenLoss())
    saved = copy.deepcopy(first.state_dict())
    assert saved["scheduler"] == {"steps_taken": 1}
    straight = first.train_step(make_batch(1), TokenLoss())

    second = PolicyModel(cfg, single_process_mesh)
    second.set_total_steps(4)
    second.load_state_dict(saved)
    resumed = second.train_step(make_batch(1), TokenLoss())
    assert resumed == straight
    for name, w in full_weights(first).items():
        assert torch.equal(full_weights(second)[name], w), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: offload moves state between GPU and CPU")
def test_optimizer_offload_on_gpu():
    from helpers import run_torchrun

    out = run_torchrun(Path(__file__).parent / "workers" / "offload_cuda.py", 1)
    assert out.count("OK ") == 2, out


def packed_batch() -> dict:
    """The rows of lengths 16, 5, 11, 8 packed two per row: 16 + 5, and 11 + 8 followed by 2 padding tokens."""
    rows = make_batch(0)
    tokens, labels, docs = [], [], []
    for a, b in ((0, 1), (2, 3)):
        la, lb = int(rows["attention_mask"][a].sum()), int(rows["attention_mask"][b].sum())
        tokens.append(torch.cat([rows["tokens"][a, :la], rows["tokens"][b, :lb]]))
        labels.append(torch.cat([rows["labels"][a, :la], rows["labels"][b, :lb]]))
        docs.append(torch.cat([torch.zeros(la, dtype=torch.long), torch.ones(lb, dtype=torch.long)]))
    width = max(len(t) for t in tokens)
    pad = lambda ts, v: torch.stack([torch.cat([t, torch.full((width - len(t),), v)]) for t in ts])  # noqa: E731
    # Padding at the end of a packed row is its own document without loss.
    return {"tokens": pad(tokens, 0), "labels": pad(labels, -100), "document_ids": pad(docs, 2)}


def test_packed_rows_equal_padded_rows(single_process_mesh):
    """The 4 sequences packed into 2 rows (document_ids), at micro-batch 1, train exactly like the padded rows."""
    padded = PolicyModel(job_config(micro_batch_size=4), single_process_mesh)
    packed = PolicyModel(job_config(micro_batch_size=1), single_process_mesh)
    for policy in (padded, packed):
        policy.set_total_steps(4)
    want = padded.train_step(make_batch(0), TokenLoss())
    got = packed.train_step(packed_batch(), TokenLoss())
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert got["rows"] == pytest.approx(want["rows"] / 2)  # 2 rows instead of 4, same tokens
    reference = full_weights(padded)
    for name, w in full_weights(packed).items():
        torch.testing.assert_close(w, reference[name], rtol=0, atol=1e-5, msg=name)


class LabelsOnlyTokenLoss(TokenLoss):
    """TokenLoss that lets the model compute logits at the labels only; records the logits shapes it gets."""

    logits_at_labels = True

    def __init__(self):
        self.shapes = []

    def __call__(self, logits, batch):
        self.shapes.append((tuple(logits.shape), int((batch["labels"] != -100).sum())))
        return super().__call__(logits, batch)


def train_side_by_side(mesh, micro_batch_size: int, loss, keys=None):
    """Two identical policies trained 2 steps, one with TokenLoss, one with ``loss``; asserts the step metrics
    (``keys``, or all) agree to rel 1e-5 and returns the two policies."""
    plain, other = (PolicyModel(job_config(micro_batch_size=micro_batch_size), mesh) for _ in range(2))
    for policy in (plain, other):
        policy.set_total_steps(4)
    for step in range(2):
        want = plain.train_step(make_batch(step), TokenLoss())
        got = other.train_step(make_batch(step), loss)
        for key in keys or want:
            assert got[key] == pytest.approx(want[key], rel=1e-5), (step, key)
    return plain, other


def test_logits_at_labels_only_trains_exactly_like_full_logits(single_process_mesh):
    loss = LabelsOnlyTokenLoss()
    full, cut = train_side_by_side(single_process_mesh, 3, loss)
    # Micro-batches of 3 rows and of 1: logits only at the most labels any row has, never [b, T, V].
    batch = make_batch(0)
    most = [int((batch["labels"][rows] != -100).sum(-1).max()) for rows in (slice(0, 3), slice(3, 4))]
    assert [shape for shape, _ in loss.shapes[:2]] == [(3, most[0], 128), (1, most[1], 128)]
    assert sum(n for _, n in loss.shapes[:2]) == int((batch["labels"] != -100).sum())  # every label kept once
    reference = full_weights(full)
    for name, w in full_weights(cut).items():
        torch.testing.assert_close(w, reference[name], rtol=0, atol=1e-5, msg=name)
    held_out = make_batch(9)
    assert cut.eval_step(held_out, loss) == pytest.approx(full.eval_step(held_out, TokenLoss()), rel=1e-5)


class PackedTokenLoss(LabelsOnlyTokenLoss):
    """A token-level loss: the model may lay a micro-batch's rows end to end without padding."""

    token_level = True

    def __call__(self, logits, batch):
        nll, _ = super().__call__(logits, batch)
        return nll, {"nll": nll.detach()}  # TokenLoss's "rows" counts rows, which packing changes


def test_token_level_loss_packs_rows_without_padding_and_trains_the_same(single_process_mesh):
    loss = PackedTokenLoss()
    padded, packed = train_side_by_side(single_process_mesh, 4, loss, keys=("loss", "nll", "grad_norm", "lr"))
    # Rows of 16, 5, 11 and 8 tokens: one row of 40 (not 4 x 16), logits at its labels only.
    batch = make_batch(0)
    assert loss.shapes[0] == ((1, int((batch["labels"] != -100).sum()), 128), int((batch["labels"] != -100).sum()))
    reference = full_weights(padded)
    for name, w in full_weights(packed).items():
        torch.testing.assert_close(w, reference[name], rtol=0, atol=1e-5, msg=name)


def test_packing_pays_for_short_uneven_rows_only():
    # SmolLM2's layer: 3.54 M matmul weights, attention 576 wide.
    layer, width = 3_538_944, 576
    assert packing_pays(torch.tensor([16, 5, 11, 8]), 16, layer, width)  # 40 tokens instead of 64
    assert not packing_pays(torch.tensor([16, 16, 16, 16]), 16, layer, width)  # no padding to remove
    # 8 rows of 4096 with 10% padding: packing saves 10% of the matmuls but attends over 29,500 tokens.
    assert not packing_pays(torch.tensor([3686] * 8), 4096, layer, width)
    rows = {"tokens": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]), "labels": torch.tensor([[2, 3, -100, -100],
                                                                                           [5, -100, -100, -100]]),
            "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    one = pack_rows(rows)
    assert one["tokens"].tolist() == [[1, 2, 3, 4, 5]] and one["labels"].tolist() == [[2, 3, -100, 5, -100]]
    assert one["document_ids"].tolist() == [[0, 0, 0, 1, 1]] and one["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_label_positions_keep_order_and_fill_short_rows():
    labels = torch.tensor([[-100, 5, 6, -100, 7], [-100, -100, -100, 9, -100], [-100] * 5])
    positions = label_positions(labels)
    assert positions.tolist() == [[1, 2, 4], [3, 0, 1], [0, 1, 2]]
    cut = at_positions({"tokens": torch.arange(15).reshape(3, 5), "labels": labels, "ref": torch.ones(3),
                        "values": torch.arange(30.0).reshape(3, 5, 2)}, positions)
    assert cut["labels"].tolist() == [[5, 6, 7], [9, -100, -100], [-100, -100, -100]]
    assert cut["tokens"].tolist() == [[1, 2, 4], [8, 5, 6], [10, 11, 12]]
    assert cut["values"][0].tolist() == [[2.0, 3.0], [4.0, 5.0], [8.0, 9.0]]
    assert cut["ref"].tolist() == [1.0, 1.0, 1.0]  # not per token: unchanged


def test_batch_without_loss_tokens_gives_zero_not_nan(single_process_mesh):
    policy = PolicyModel(job_config(micro_batch_size=2), single_process_mesh)
    batch = make_batch(0)
    batch["labels"][:] = -100
    before = full_weights(policy)
    metrics = policy.train_step(batch, TokenLoss())
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0 and metrics["rows"] == 4.0
    # Only weight decay moves the matrices (lr 1e-3 x 0.1); norms stay.
    after = full_weights(policy)
    torch.testing.assert_close(after["layers.0.input_layernorm.weight"], before["layers.0.input_layernorm.weight"])
    torch.testing.assert_close(after["output.weight"], before["output.weight"] * (1 - 1e-4))


def test_builds_from_a_checkpoint_directory(single_process_mesh, tmp_path):
    """model.path: the weights and architecture come from the Hugging Face directory (tied here)."""
    from helpers import tiny_model

    from aligner.models.hf import save_hf_checkpoint

    saved = tiny_model(seed=3, tie_word_embeddings=True)
    save_hf_checkpoint(saved, None, tmp_path / "hf")
    cfg = job_config()
    cfg.model.arch, cfg.model.path = None, str(tmp_path / "hf")
    policy = PolicyModel(cfg, single_process_mesh)
    assert policy.config.tie_word_embeddings and policy.config.num_hidden_layers == 4
    weights = full_weights(policy)
    for name, p in saved.named_parameters():
        assert torch.equal(weights[name], p.detach()), name
    assert policy.model.output.weight is policy.model.tok_embeddings.weight
