"""AdamW groups, the LR schedule against hand-computed values, and clipping against torch's."""
import math

import pytest
import torch
from helpers import tiny_model

from aligner.config import OptimConfig
from aligner.wrappers import LRSchedule, build_optimizer, clip_grad_norm, lr_at, move_optimizer_state
from aligner.wrappers.optimizer import optimizer_state_devices


def optim(name: str, warmup: int = 0, lr: float = 1e-3, min_lr: float = 0.0, **kw) -> OptimConfig:
    cfg = OptimConfig(lr=lr, **kw)
    cfg.sched.name, cfg.sched.warmup_steps, cfg.sched.min_lr = name, warmup, min_lr
    return cfg


@pytest.mark.parametrize("name, warmup, min_lr, total, expected", [
    # warmup 2 then flat
    ("constant", 2, 0.0, 10, [0.0, 5e-4, 1e-3, 1e-3, 1e-3]),
    # warmup 2, then (10 - 2) decay steps: 1e-3 * (1 - (s - 2) / 8)
    ("linear", 2, 0.0, 10, [0.0, 5e-4, 1e-3, 8.75e-4, 7.5e-4, 6.25e-4, 5e-4, 3.75e-4, 2.5e-4, 1.25e-4, 0.0]),
    # to min_lr 1e-4: 1e-4 + 9e-4 * (1 - (s - 2) / 8)
    ("linear", 2, 1e-4, 10, [0.0, 5e-4, 1e-3, 8.875e-4, 7.75e-4]),
    # cosine over 4 decay steps: 0.5 * (1 + cos(pi * k / 4)) = 1, 0.853553, 0.5, 0.146447, 0
    ("cosine", 1, 0.0, 5, [0.0, 1e-3, 8.535534e-4, 5e-4, 1.464466e-4, 0.0]),
    ("cosine", 0, 1e-4, 4, [1e-3, 1e-4 + 9e-4 * 0.853553, 5.5e-4, 1e-4 + 9e-4 * 0.146447, 1e-4]),
])
def test_lr_at_hand_computed(name, warmup, min_lr, total, expected):
    cfg = optim(name, warmup=warmup, min_lr=min_lr)
    got = [lr_at(s, cfg, total) for s in range(len(expected))]
    assert got == pytest.approx(expected, abs=1e-9)


def test_lr_stays_at_min_lr_after_the_end():
    assert lr_at(25, optim("cosine", min_lr=1e-5), 20) == pytest.approx(1e-5)


def test_decay_without_total_steps_names_the_fix():
    cfg = optim("cosine", warmup=2)
    assert lr_at(1, cfg, None) == pytest.approx(5e-4)  # warmup needs no total
    with pytest.raises(ValueError, match="set_total_steps"):
        lr_at(3, cfg, None)


def test_schedule_sets_groups_and_round_trips():
    model = tiny_model()
    cfg = optim("linear", warmup=1)
    opt = build_optimizer(model.parameters(), cfg)
    sched = LRSchedule(opt, cfg, total_steps=5)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    sched.step(), sched.step()
    assert sched.apply() == pytest.approx(1e-3 * 3 / 4) and opt.param_groups[1]["lr"] == sched.lr
    state = sched.state_dict()
    other = LRSchedule(build_optimizer(model.parameters(), cfg), cfg, total_steps=5)
    other.load_state_dict(state)
    assert other.apply() == sched.lr and other.optimizer.param_groups[0]["lr"] == sched.lr
    sched.total_steps = 9  # a longer run decays over the new length
    assert sched.lr == pytest.approx(1e-3 * (1 - 1 / 8))


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_model(attention_bias=True, qk_norm=True)
    cfg = optim("constant", lr=0.5, weight_decay=0.1)
    opt = build_optimizer(model.parameters(), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only decoupled weight decay moves weights
    opt.step()
    no_decay = [n for n in before if n.endswith("bias") or "norm" in n]
    assert len(no_decay) == 4 * (3 + 4) + 1  # per layer 3 biases + 4 norms; the final norm
    for name, p in model.named_parameters():
        factor = 1.0 if name in no_decay else 1 - 0.5 * 0.1
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clip_grad_norm_equals_torch(max_norm):
    a, b = tiny_model(seed=1), tiny_model(seed=1)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for m in (a, b):
        m(tokens).logsumexp(-1).mean().backward()
    got = clip_grad_norm(a.parameters(), max_norm)
    want = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    assert got == pytest.approx(float(want), rel=1e-6)
    assert (got > max_norm) == (max_norm == 0.05)  # the small bound clips, the large one does not
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=0, msg=name)


def test_clip_skips_tied_copies_in_the_norm_only():
    model = tiny_model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    head = model.output.weight
    full = clip_grad_norm(model.parameters(), 0)
    without_head = clip_grad_norm(model.parameters(), 1.0, tied_copies=[head])
    assert full == pytest.approx(math.sqrt(sum(p.numel() for p in model.parameters())))
    assert without_head == pytest.approx(math.sqrt(full ** 2 - head.numel()))
    assert head.grad[0, 0].item() == pytest.approx(1.0 / (without_head + 1e-6))  # still clipped


def test_move_optimizer_state_keeps_values():
    model = tiny_model()
    opt = build_optimizer(model.parameters(), optim("constant"))
    assert optimizer_state_devices(opt) == set()
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    move_optimizer_state(opt, "cpu")
    assert optimizer_state_devices(opt) == {"cpu"}
    for p, s in opt.state.items():
        for k, v in s.items():
            torch.testing.assert_close(v, before[id(p)][k], rtol=0, atol=0)
