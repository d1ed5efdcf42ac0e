"""Module basics: parameter discovery, state dicts, modes, devices and dtypes, and the layers
against NumPy (their gradients are the ops' gradients, checked once more here through the
modules in float64)."""

import numpy as np
import pytest

import autograd
from autograd import Tensor, gradcheck, nn
from autograd.testing import device_params

DEVICES = device_params()


class Block(nn.Module):
    def __init__(self, dim):
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(0.5)
        self.scale = Tensor(np.ones(dim, np.float32))  # a buffer, not a parameter

    def forward(self, x):
        return x + self.drop(self.fc(self.norm(x)))


class Net(nn.Module):
    def __init__(self, vocab=7, dim=4, depth=2):
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = [Block(dim) for _ in range(depth)]
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_parameters_are_found_by_attribute_and_named_by_path():
    net = Net()
    names = [name for name, _ in net.named_parameters()]
    assert names == [
        "emb.weight",
        "blocks.0.norm.weight", "blocks.0.norm.bias", "blocks.0.fc.weight",
        "blocks.1.norm.weight", "blocks.1.norm.bias", "blocks.1.fc.weight",
        "head.weight", "head.bias",
    ]
    assert all(p.requires_grad and isinstance(p, nn.Parameter) for p in net.parameters())
    assert net.num_parameters() == 7 * 4 + 2 * (4 + 4 + 16) + (7 * 4 + 7)
    assert len(net.modules()) == 1 + 1 + 2 * 4 + 1


def test_state_dict_round_trip_and_checked_loading():
    autograd.manual_seed(0)
    a = Net()
    autograd.manual_seed(1)
    b = Net()
    state = {k: v.copy() for k, v in a.state_dict().items()}
    b.load_state_dict(state)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy(), err_msg=name)
    state["head.bias"][0] = 123.0
    assert b.head.bias.numpy()[0] != 123.0  # loading copies

    before = b.head.weight.numpy().copy()
    bad = dict(state, **{"head.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(3, 3\).*\(7, 4\)"):
        b.load_state_dict(bad)
    np.testing.assert_array_equal(b.head.weight.numpy(), before)  # nothing changed
    partial = {k: v for k, v in state.items() if k != "emb.weight"}
    partial["extra"] = np.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['emb.weight'\].*unexpected \['extra'\]"):
        b.load_state_dict(partial)
    missing, unexpected = b.load_state_dict(partial, strict=False)
    assert missing == ["emb.weight"] and unexpected == ["extra"]


def test_train_and_eval_reach_every_module():
    net = Net()
    autograd.manual_seed(0)
    idx = np.array([[1, 2, 3]])
    net.eval()
    assert not any(m.training for m in net.modules())
    np.testing.assert_array_equal(net(idx).numpy(), net(idx).numpy())  # no dropout
    net.train()
    assert all(m.training for m in net.modules())
    assert not np.array_equal(net(idx).numpy(), net(idx).numpy())  # dropout draws new masks


def test_zero_grad_and_to_dtype():
    net = Net()
    net(np.array([0, 1])).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    net.to(dtype="float64")
    assert all(p.dtype == np.float64 for p in net.parameters())
    assert net.blocks[0].scale.dtype == np.float32  # buffers keep their dtype


@pytest.mark.parametrize("device", DEVICES)
def test_layers_against_numpy(device):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4))
    lin = nn.Linear(4, 5, dtype="float64", device=device)
    W, b = lin.weight.numpy(), lin.bias.numpy()
    assert np.all(np.abs(W) <= 0.5) and W.shape == (5, 4)  # uniform in +-1/sqrt(4)
    np.testing.assert_allclose(lin(Tensor(x, device=device)).numpy(), x @ W.T + b, rtol=1e-12)

    emb = nn.Embedding(6, 4, dtype="float64", device=device)
    idx = np.array([[0, 5], [5, 2]])
    np.testing.assert_array_equal(emb(idx).numpy(), emb.weight.numpy()[idx])

    ln = nn.LayerNorm(4, dtype="float64", device=device)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ln(Tensor(x, device=device)).numpy(), want, rtol=1e-10)

    rms = nn.RMSNorm(4, dtype="float64", device=device)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rms(Tensor(x, device=device)).numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_through_a_module(device):
    autograd.manual_seed(0)
    net = Net().to(device=device, dtype="float64").eval()
    idx = np.array([[1, 2, 3, 1]])
    params = net.parameters()

    def loss(*ps):  # the module reads its parameters; gradcheck perturbs these same tensors
        return autograd.cross_entropy(net(idx), np.array([[2, 3, 4, 0]]))

    assert gradcheck(loss, params)
