"""Mixed precision: precision modes, shared low-precision copies, dynamic loss scaling."""

import numpy as np
import pytest

import autograd
from autograd import Tensor, amp, ops, optim
from autograd.testing import device_params


@pytest.fixture(autouse=True)
def _float32_after():
    yield
    amp.set_precision("float32")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        amp.set_precision("float8")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
def test_low_precision_products_keep_float32_results_and_gradients(device, mode):
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((4, 6, 32)).astype(np.float32), requires_grad=True, device=device)
    w = Tensor((rng.standard_normal((16, 32)) * 0.1).astype(np.float32), requires_grad=True, device=device)
    want = ops.linear(x, w)
    want.backward(want.xp.ones(want.shape, np.float32))
    gw_want = w.grad.copy()
    w.grad = None
    with amp.autocast(mode):
        got = ops.linear(x, w)
        got.backward(got.xp.ones(got.shape, np.float32))
    assert got.dtype == np.float32 and w.grad.dtype == np.float32  # float32 master weights
    err = np.abs(got.numpy() - want.numpy()).max() / np.abs(want.numpy()).max()
    gerr = float(abs(w.grad - gw_want).max() / abs(gw_want).max())
    assert 0 < err < 2e-2 and gerr < 2e-2  # rounded (not exact), but close
    assert amp.precision() == "float32"  # autocast restored the mode


def test_products_reading_one_activation_share_its_low_precision_copy():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((5, 8)).astype(np.float32), requires_grad=True)
    h = x * 2.0  # an activation (non-leaf)
    wq, wk = (Tensor(rng.standard_normal((4, 8)).astype(np.float32), requires_grad=True) for _ in range(2))
    with amp.autocast("bfloat16"):
        q, k = ops.linear(h, wq), ops.linear(h, wk)
    assert q._ctx.x is k._ctx.x and q._ctx.x.dtype.name == "bfloat16"
    with amp.autocast("float16"):  # a new mode makes a new copy
        v = ops.linear(h, wq)
    assert v._ctx.x.dtype == np.float16


def test_grad_scaler_skips_an_overflowing_step_and_backs_off():
    p = autograd.nn.Parameter(np.ones(3, np.float32))
    scaler = amp.GradScaler(init_scale=1024.0, growth_interval=2)
    p.grad = np.array([1024.0, np.inf, 2048.0], np.float32)
    assert scaler.unscale_([p]) is False
    scaler.update()
    assert scaler.scale_value == 512.0
    p.grad = np.array([512.0, 1024.0, -512.0], np.float32)
    assert scaler.unscale_([p]) is True
    assert np.array_equal(p.grad, [1.0, 2.0, -1.0])  # unscaled exactly
    scaler.update()
    p.grad = np.ones(3, np.float32)
    scaler.unscale_([p])
    scaler.update()
    assert scaler.scale_value == 1024.0  # two good steps in a row: grows again


def test_float16_training_survives_injected_overflow():
    from tinyllm.model import GPT

    autograd.manual_seed(0)
    model = GPT.from_preset("laptop", n_layers=1, d_model=32, n_heads=2, context_length=8, vocab_size=50)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    scaler = amp.GradScaler(init_scale=2.0**12)
    data = np.random.default_rng(0).integers(0, 50, (4, 9))
    x, y = data[:, :-1], data[:, 1:]
    amp.set_precision("float16")
    losses = []
    for step in range(6):
        _, loss = model(x, y)
        scaled = scaler.scale(loss * (1e38 if step == 2 else 1.0))  # step 2 overflows float16
        scaled.backward()
        before = [p.data.copy() for p in model.parameters()]
        if scaler.unscale_(model.parameters()):
            opt.step()
        stepped = not scaler.found_inf
        scaler.update()
        opt.zero_grad()
        after = [p.data for p in model.parameters()]
        unchanged = all(np.array_equal(a, b) for a, b in zip(before, after))
        assert unchanged == (step == 2) and stepped == (step != 2)
        assert all(np.isfinite(p.data).all() for p in model.parameters())
        losses.append(loss.item())
    assert scaler.scale_value == 2.0**11  # halved once
    assert losses[-1] < losses[0]  # and training went on


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("mode, tiny, huge", [("float16", 1e-9, 1e5), ("bfloat16", 1e-42, 3.4e38)])
def test_cast_counts_name_overflows_and_underflows(device, mode, tiny, huge):
    if mode == "bfloat16":
        pytest.importorskip("ml_dtypes")
    x = np.ones((3, 4), np.float32)
    x[0, 0], x[1, 2], x[2, 3] = tiny, huge, 0.0  # an underflow, an overflow, a zero that stays
    x[2, 0] = np.inf  # already inf: not an overflow of the cast
    w = np.full((5, 4), 0.5, np.float32)
    w[4, 1] = -huge
    amp.cast_counts(reset=True)
    with amp.autocast(mode), autograd.no_grad():
        ops.linear(Tensor(x, device=device), Tensor(w, device=device))  # counting off
    assert amp.cast_counts() == {"values": 0, "overflow": 0, "underflow": 0}
    amp.count_casts()
    try:
        with amp.autocast(mode), autograd.no_grad():
            ops.linear(Tensor(x, device=device), Tensor(w, device=device))
            ops.linear(Tensor(x, device=device), Tensor(w, device=device))
        ops.linear(Tensor(x, device=device), Tensor(w, device=device))  # float32: no cast
    finally:
        amp.count_casts(False)
    got = amp.cast_counts(reset=True)
    # bfloat16 shares float32's exponent range, so only a float32 denormal underflows; the GPU
    # build of the cast flushes denormal inputs, leaving nothing to count there
    underflow = 0 if (mode == "bfloat16" and device == "cuda") else 2
    assert got == {"values": 2 * (12 + 20), "overflow": 4, "underflow": underflow}
    assert amp.cast_counts() == {"values": 0, "overflow": 0, "underflow": 0}
