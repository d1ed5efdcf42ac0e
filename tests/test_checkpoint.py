"""Activation checkpointing (autograd.checkpoint): the same values and gradients as the
unwrapped computation, dropout replayed, and less memory held between forward and backward."""

import tracemalloc

import numpy as np
import pytest

import autograd
from autograd import Tensor, ops
from autograd.checkpoint import checkpoint
from autograd.testing import device_params
from tinyllm.model import GPT


def mlp(x, w1, w2):
    return ops.tanh(x @ w1) @ w2 + x  # x used twice: through the MLP and the residual


def test_checkpoint_gives_the_unwrapped_values_and_gradients():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in ((5, 4), (4, 6), (6, 4))]
    upstream = rng.standard_normal((5, 4))
    plain = [Tensor(a, requires_grad=True) for a in arrays]
    y = mlp(*plain)
    y.backward(upstream)
    ck = [Tensor(a, requires_grad=True) for a in arrays]
    z = checkpoint(lambda x: mlp(x, ck[1], ck[2]), ck[0], params=ck[1:])
    assert z._ctx is not None and len(z._ctx.inputs) == 3  # one node for the whole fn
    z.backward(upstream)
    np.testing.assert_array_equal(z.numpy(), y.numpy())
    for a, b in zip(ck, plain):
        np.testing.assert_allclose(a.grad, b.grad, rtol=1e-13, atol=1e-15)
    # autograd.grad through it, and a frozen parameter (no gradient asked, none given)
    w1 = Tensor(arrays[1])
    x = Tensor(arrays[0], requires_grad=True)
    gx, gw2 = autograd.grad(checkpoint(lambda x: mlp(x, w1, ck[2]), x, params=[w1, ck[2]]),
                            [x, ck[2]], upstream)
    np.testing.assert_allclose(gx, plain[0].grad, rtol=1e-13)
    np.testing.assert_allclose(gw2, plain[2].grad, rtol=1e-13)


def test_checkpoint_errors_name_the_problem():
    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(TypeError, match="input 0 is a ndarray"):
        checkpoint(lambda x: x, np.ones(3))
    with pytest.raises(TypeError, match="must return one Tensor"):
        checkpoint(lambda x: (x, x), x)


def small_gpt(device, dropout):
    autograd.manual_seed(0)
    return GPT.from_preset("laptop", vocab_size=50, n_layers=3, d_model=32, n_heads=4,
                           context_length=16, dropout=dropout, dtype="float64", device=device)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointed_blocks_train_like_plain_blocks(device, dropout):
    # the same loss and gradients with and without checkpointing; with dropout the rerun in
    # backward must draw the same masks as the forward did
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 50, (2, 3, 16))
    results = []
    for recompute in (False, True):
        model = small_gpt(device, dropout)
        model.checkpoint_blocks = recompute
        autograd.manual_seed(7)
        _, loss = model(idx, targets)
        loss.backward()
        results.append((loss.item(), [p.grad.get() if device == "cuda" else p.grad for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert l0 == l1
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-13)


def test_checkpointed_blocks_hold_less_memory_until_backward():
    # what the graph keeps alive between forward and backward: every block's activations
    # without checkpointing, only the blocks' inputs with it
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 50, (2, 8, 16))
    held = []
    for recompute in (False, True):
        model = GPT.from_preset("laptop", vocab_size=50, n_layers=6, d_model=64, n_heads=4,
                                context_length=16, dtype="float64")
        model.checkpoint_blocks = recompute
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        _, loss = model(idx, targets, return_logits=False)
        held.append(tracemalloc.get_traced_memory()[0] - base)
        tracemalloc.stop()
        loss.backward()
    assert held[1] < 0.3 * held[0], held
