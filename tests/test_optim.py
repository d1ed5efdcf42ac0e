"""Optimizers against PyTorch, schedules at their landmarks, clipping against NumPy."""

import math

import numpy as np
import pytest

from autograd import Tensor
from autograd.nn import Parameter
from autograd.optim import (
    SGD, AdamW, ConstantSchedule, CosineSchedule, LinearSchedule, clip_grad_norm, grad_norm,
    make_schedule,
)

SHAPES = [(5, 3), (3,), (4, 2, 2), (1,)]


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def grads_for(step, seed=1):
    rng = np.random.default_rng([seed, step])
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def run_ours(make_opt, steps, lrs=None):
    params = [Parameter(a.copy()) for a in make_params()]
    opt = make_opt(params)
    history = []
    for t in range(steps):
        for p, g in zip(params, grads_for(t)):
            p.grad = g
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        opt.step()
        history.append([p.data.copy() for p in params])
    return history


def run_torch(torch, make_opt, steps, lrs=None):
    params = [torch.nn.Parameter(torch.tensor(a.copy())) for a in make_params()]
    opt = make_opt(params)
    history = []
    for t in range(steps):
        for p, g in zip(params, grads_for(t)):
            p.grad = torch.tensor(g)
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        opt.step()
        history.append([p.detach().numpy().copy() for p in params])
    return history


def assert_same_history(ours, theirs, rtol=2e-6, atol=2e-7):
    for t, (a, b) in enumerate(zip(ours, theirs)):
        for i, (x, y) in enumerate(zip(a, b)):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                                       err_msg=f"step {t + 1}, parameter {i}")


def test_adamw_matches_torch_step_for_step():
    torch = pytest.importorskip("torch")
    lrs = [1e-2 * (0.9 ** t) for t in range(20)]  # a changing lr, as under a schedule

    def torch_groups(ps):  # our default: decay matrices, not vectors
        return [{"params": [p for p in ps if p.ndim >= 2]},
                {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}]

    ours = run_ours(lambda ps: AdamW(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                                     weight_decay=0.1), 20, lrs)
    theirs = run_torch(torch, lambda ps: torch.optim.AdamW(
        torch_groups(ps), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1), 20, lrs)
    assert_same_history(ours, theirs)


def test_adamw_decay_1d_matches_torch_default():
    torch = pytest.importorskip("torch")
    ours = run_ours(lambda ps: AdamW(ps, lr=3e-3, weight_decay=0.5, decay_1d=True), 10)
    theirs = run_torch(torch, lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.5), 10)
    assert_same_history(ours, theirs)


def test_adamw_leaves_1d_params_undecayed_by_default():
    # zero gradients: Adam's update is 0, so only weight decay could move a parameter
    params = [Parameter(a.copy()) for a in make_params()]
    before = [p.data.copy() for p in params]
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    for p in params:
        p.grad = np.zeros_like(p.data)
    opt.step()
    for p, b in zip(params, before):
        if p.ndim >= 2:
            np.testing.assert_allclose(p.data, b * (1 - 0.1 * 0.5), rtol=1e-6)
        else:
            np.testing.assert_array_equal(p.data, b)


@pytest.mark.parametrize("kw", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, dampening=0.1, weight_decay=0.01),
                                dict()])
def test_sgd_matches_torch(kw):
    torch = pytest.importorskip("torch")
    ours = run_ours(lambda ps: SGD(ps, lr=0.05, **kw), 10)
    theirs = run_torch(torch, lambda ps: torch.optim.SGD(ps, lr=0.05, **kw), 10)
    assert_same_history(ours, theirs)


def test_optimizer_state_dict_round_trip_continues_identically():
    def make(ps):
        return AdamW(ps, lr=1e-2, weight_decay=0.1)

    full = run_ours(make, 8)
    params = [Parameter(a.copy()) for a in make_params()]
    opt = make(params)
    for t in range(8):
        if t == 4:  # rebuild parameters and optimizer from saved state, as a resume does
            saved_w = [p.data.copy() for p in params]
            sd = opt.state_dict()
            params = [Parameter(w) for w in saved_w]
            opt = make(params)
            opt.load_state_dict(sd)
        for p, g in zip(params, grads_for(t)):
            p.grad = g
        opt.step()
    for a, b in zip(full[-1], [p.data for p in params]):
        assert np.array_equal(a, b)


def test_optimizer_load_state_dict_rejects_other_shapes():
    params = [Parameter(a.copy()) for a in make_params()]
    opt = AdamW(params)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.step()
    sd = opt.state_dict()
    other = AdamW([Parameter(np.zeros((2, 2), np.float32)), Parameter(np.zeros(3, np.float32))])
    with pytest.raises(ValueError, match="parameters|shape"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="SGD"):
        SGD(params).load_state_dict(sd)


def test_cosine_schedule_landmarks():
    s = CosineSchedule(max_lr=1e-3, warmup_steps=100, total_steps=2000, min_lr=1e-4)
    assert s(0) == pytest.approx(1e-5)  # (0 + 1) / 100 of the peak
    assert s(49) == pytest.approx(5e-4)
    assert s(99) == pytest.approx(1e-3)  # warmup ends at the peak
    assert s(100) == pytest.approx(1e-3)
    assert s(1050) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the decay
    assert s(2000) == pytest.approx(1e-4)
    assert s(5000) == pytest.approx(1e-4)
    lrs = [s(t) for t in range(100, 2001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_linear_and_constant_schedules():
    s = LinearSchedule(max_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.0)
    assert s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)
    assert s(110) == pytest.approx(0.0)
    c = ConstantSchedule(max_lr=0.3, warmup_steps=4)
    assert [c(t) for t in range(6)] == pytest.approx([0.075, 0.15, 0.225, 0.3, 0.3, 0.3])
    assert make_schedule("constant", 0.3)(0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        make_schedule("cosin", 1.0, total_steps=10)


def test_schedule_apply_sets_group_lrs():
    params = [Parameter(a.copy()) for a in make_params()]
    opt = AdamW([{"params": params[:2]}, {"params": params[2:], "lr_scale": 0.5}])
    lr = CosineSchedule(1e-3, 10, 100).apply(opt, 9)
    assert lr == pytest.approx(1e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 5e-4])


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_numpy(max_norm):
    grads = grads_for(0)
    params = [Parameter(a) for a in make_params()]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    ref_norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    total = clip_grad_norm(params, max_norm)
    assert total == pytest.approx(ref_norm, rel=1e-5)
    scale = min(1.0, max_norm / (ref_norm + 1e-6))
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, g * scale, rtol=1e-5)
    after = np.sqrt(sum((p.grad.astype(np.float64) ** 2).sum() for p in params))
    assert after == pytest.approx(min(ref_norm, max_norm), rel=1e-4)


def test_clip_grad_norm_skips_missing_grads_and_leaves_nonfinite_alone():
    a, b = Parameter(np.ones(3, np.float32)), Parameter(np.ones(2, np.float32))
    a.grad = np.array([3.0, 4.0, 0.0], np.float32)
    assert grad_norm([a, b]) == pytest.approx(5.0)
    a.grad = np.array([np.inf, 1.0, 0.0], np.float32)
    assert math.isinf(clip_grad_norm([a, b], 1.0))
    assert a.grad[1] == 1.0


def test_adamw_trains_a_least_squares_problem():
    # minimise |X w - y|^2 through the engine: the loss must fall by orders of magnitude
    rng = np.random.default_rng(0)
    X = Tensor(rng.standard_normal((64, 8)).astype(np.float32))
    w_true = rng.standard_normal((8, 1)).astype(np.float32)
    y = Tensor(X.data @ w_true)
    w = Parameter(np.zeros((8, 1), np.float32))
    opt = AdamW([w], lr=0.05, weight_decay=0.0)
    first = None
    for _ in range(300):
        loss = ((X @ w - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 1e-3
