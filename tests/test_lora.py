"""LoRA: the lora_linear op's gradients, the LoRALinear layer, adapters on a GPT and their files.

Expectations are plain NumPy written here (x W^T + b + s (x A^T) B^T, W + s B A), never the
code under test.
"""

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import autograd
from autograd import Tensor, amp, gradcheck, nn, no_grad, ops
from autograd.optim import AdamW
from autograd.testing import device_params, float_arrays, shapes
from tinyllm import safetensors
from tinyllm.lora import (
    TARGETS, LoRAConfig, apply_lora, load_adapters, load_adapters_into, lora_state_dict,
    merge_lora, save_adapters,
)
from tinyllm.model import GPT

DEVICES = device_params()


def reference(x, w, a, b_up, scale, bias=None):
    y = x @ w.T + scale * (x @ a.T) @ b_up.T
    return y if bias is None else y + bias


# ---- the op ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_lora_linear_gradients(device, data):
    fan_in, fan_out, rank = (data.draw(st.integers(1, 4)) for _ in range(3))
    x = data.draw(float_arrays(data.draw(shapes(1, 2)) + (fan_in,)))  # x of 2 or 3 dims
    w = data.draw(float_arrays((fan_out, fan_in)))
    a, b_up = data.draw(float_arrays((rank, fan_in))), data.draw(float_arrays((fan_out, rank)))
    bias = data.draw(float_arrays((fan_out,))) if data.draw(st.booleans()) else None
    scale = data.draw(st.floats(-2.0, 2.0))
    w_trained = data.draw(st.booleans())  # False: the frozen base weight of LoRA training
    arrays = [x, w, a, b_up] + ([] if bias is None else [bias])
    leaves = [Tensor(v, requires_grad=(i != 1 or w_trained), device=device)
              for i, v in enumerate(arrays)]

    def f(x, w, a, b_up, bias=None):
        return ops.lora_linear(x, w, a, b_up, scale, bias)

    out = f(*leaves)
    assert out.dtype == np.float64 and out.shape == x.shape[:-1] + (fan_out,)
    np.testing.assert_allclose(out.numpy(), reference(x, w, a, b_up, scale, bias),
                               rtol=1e-10, atol=1e-12)
    assert gradcheck(f, leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_float32_matches_float64_reference(device):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 5, 8)), rng.standard_normal((6, 8))
    a, b_up, bias = rng.standard_normal((2, 8)), rng.standard_normal((6, 2)), rng.standard_normal(6)
    ts = [Tensor(v.astype(np.float32), requires_grad=True, device=device) for v in (x, w, a, b_up, bias)]
    y = ops.lora_linear(ts[0], ts[1], ts[2], ts[3], 0.5, ts[4])
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.numpy(), reference(x, w, a, b_up, 0.5, bias), rtol=1e-4, atol=1e-4)
    g = rng.standard_normal(y.shape)
    y.backward(g.astype(np.float32))
    # dB = s g^T (x A^T) over all rows, computed here in float64
    g2, x2 = g.reshape(-1, 6), x.reshape(-1, 8)
    np.testing.assert_allclose(autograd.backend.to_device(ts[3].grad, "cpu"),
                               0.5 * g2.T @ (x2 @ a.T), rtol=1e-4, atol=1e-4)
    assert all(t.grad.dtype == np.float32 for t in ts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
def test_lora_linear_low_precision_keeps_float32(device, mode):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((4, 6, 32)), rng.standard_normal((16, 32)) * 0.1,
              rng.standard_normal((4, 32)) * 0.1, rng.standard_normal((16, 4)) * 0.1]

    def run():
        ts = [Tensor(a.astype(np.float32), requires_grad=True, device=device) for a in arrays]
        y = ops.lora_linear(*ts, 2.0)
        y.backward(y.xp.ones(y.shape, np.float32))
        return y, ts

    want, want_ts = run()
    try:
        with amp.autocast(mode):
            got, got_ts = run()
    finally:
        amp.set_precision("float32")
    assert got.dtype == np.float32
    err = np.abs(got.numpy() - want.numpy()).max() / np.abs(want.numpy()).max()
    assert 0 < err < 2e-2  # rounded in the low dtype (not exact), but close
    for g_t, w_t in zip(got_ts, want_ts):
        assert g_t.grad.dtype == np.float32  # float32 master weights get float32 gradients
        assert float(abs(g_t.grad - w_t.grad).max() / abs(w_t.grad).max()) < 3e-2


def test_lora_linear_shape_errors_name_the_shapes():
    x, w = Tensor(np.ones((2, 3))), Tensor(np.ones((4, 3)))
    a, b_up = Tensor(np.ones((2, 3))), Tensor(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"input of shape \(2, 5\) does not fit weight of shape \(4, 3\)"):
        ops.lora_linear(Tensor(np.ones((2, 5))), w, a, b_up, 1.0)
    with pytest.raises(ValueError, match=r"lora_A of shape \(2, 4\) and lora_B of shape \(4, 2\)"):
        ops.lora_linear(x, w, Tensor(np.ones((2, 4))), b_up, 1.0)
    with pytest.raises(ValueError, match=r"lora_B of shape \(4, 3\) do not fit weight of shape \(4, 3\)"):
        ops.lora_linear(x, w, a, Tensor(np.ones((4, 3))), 1.0)
    with pytest.raises(ValueError, match=r"bias of shape \(3,\) for weight of shape \(4, 3\)"):
        ops.lora_linear(x, w, a, b_up, 1.0, Tensor(np.ones(3)))
    with pytest.raises(ValueError, match="scale must be a finite number, not nan"):
        ops.lora_linear(x, w, a, b_up, float("nan"))


# ---- the layer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_layer_starts_as_its_base_and_merges_exactly(device, dtype, tol, bias):
    autograd.manual_seed(0)
    base = nn.Linear(8, 6, bias=bias, dtype=dtype, device=device)
    layer = nn.LoRALinear(base, rank=3, alpha=12)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and (not bias or not layer.bias.requires_grad)
    assert layer.scale == 4.0
    assert layer.lora_A.shape == (3, 8) and layer.lora_B.shape == (6, 3)
    assert layer.lora_A.dtype == np.dtype(dtype) and layer.lora_A.device == base.weight.device
    assert float(abs(layer.lora_A.numpy()).max()) <= 1 / np.sqrt(8)
    assert not np.any(layer.lora_B.numpy())
    x = Tensor(np.random.default_rng(1).standard_normal((2, 5, 8)), dtype=dtype, device=device)
    np.testing.assert_array_equal(layer(x).numpy(), base(x).numpy())  # B = 0: exactly the base

    layer.lora_B.data = layer.lora_B.xp.asarray(
        np.random.default_rng(2).standard_normal((6, 3)).astype(dtype))
    merged = layer.merged()
    assert isinstance(merged, nn.Linear) and merged.bias is layer.bias
    assert merged.weight.dtype == np.dtype(dtype) and merged.weight.device == base.weight.device
    w, a, b_up = (t.numpy().astype(np.float64) for t in (base.weight, layer.lora_A, layer.lora_B))
    np.testing.assert_allclose(merged.weight.numpy(), w + 4.0 * b_up @ a, rtol=tol, atol=tol)
    got, want = merged(x).numpy(), layer(x).numpy()
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    assert np.abs(want - base(x).numpy()).max() > 0.1  # the update does change the output


def test_lora_layer_init_is_seeded_and_checks_its_arguments():
    def a_of(seed):
        autograd.manual_seed(seed)
        return nn.LoRALinear(nn.Linear(4, 4), rank=2, alpha=1.0).lora_A.numpy()

    np.testing.assert_array_equal(a_of(5), a_of(5))
    assert not np.array_equal(a_of(5), a_of(6))
    with pytest.raises(ValueError, match="rank must be a positive integer, not 0"):
        nn.LoRALinear(nn.Linear(4, 4), rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, not -1"):
        nn.LoRALinear(nn.Linear(4, 4), rank=2, alpha=-1)
    with pytest.raises(TypeError, match="wraps an nn.Linear, not Embedding"):
        nn.LoRALinear(nn.Embedding(4, 4), rank=2, alpha=1.0)


# ---- the config -----------------------------------------------------------------------------------

def test_lora_config_defaults_and_round_trip():
    c = LoRAConfig(rank=4)
    assert c.alpha == 8.0 and c.targets == TARGETS and c.scale == 2.0
    c = LoRAConfig(rank=2, alpha=3, targets=["wq", "wv"])
    assert c.targets == ("wq", "wv")
    assert LoRAConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.to_dict() == {"rank": 2, "alpha": 3.0, "targets": ["wq", "wv"]}


def test_lora_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="rank=0: must be a positive integer"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="alpha=-1: must be a finite number > 0"):
        LoRAConfig(rank=4, alpha=-1)
    with pytest.raises(ValueError, match="unknown target 'wz' in targets; allowed: wq, wk, wv, wo, w1, w2, w3"):
        LoRAConfig(rank=4, targets=("wq", "wz"))
    with pytest.raises(ValueError, match="targets=\\(\\): name at least one of"):
        LoRAConfig(rank=4, targets=())
    with pytest.raises(ValueError, match="target 'wq' is named twice"):
        LoRAConfig(rank=4, targets=("wq", "wq"))
    with pytest.raises(ValueError, match="unknown fields \\['dropout'\\]"):
        LoRAConfig.from_dict({"rank": 4, "dropout": 0.1})


# ---- on a GPT -----------------------------------------------------------------------------------------

def tiny_gpt(seed=0, **kw):
    autograd.manual_seed(seed)
    settings = dict(n_layers=2, d_model=32, n_heads=2, vocab_size=64, context_length=16)
    settings.update(kw)
    return GPT.from_preset("laptop", **settings)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 64, (4, 16)), rng.integers(0, 64, (4, 16))


def cpu(a):
    return autograd.backend.to_device(a, "cpu")


def logits_of(model, idx):
    with no_grad():
        return model(idx)[0].numpy()


@pytest.mark.parametrize("device", DEVICES)
def test_apply_lora_trains_only_the_adapters_and_merges_to_the_same_model(device):
    model = tiny_gpt(device=device)
    names_before = set(model.state_dict())
    base = {name: cpu(a) for name, a in model.state_dict().items()}
    params = apply_lora(model, LoRAConfig(rank=4, alpha=8))

    wrapped = [f"blocks.{i}.{part}" for i in range(2) for part in (
        "attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2")]
    by_id = {id(p): name for name, p in model.named_parameters()}
    assert [by_id[id(p)] for p in params] == [f"{w}.{k}" for w in wrapped for k in ("lora_A", "lora_B")]
    assert set(model.state_dict()) == names_before | {by_id[id(p)] for p in params}
    assert set(lora_state_dict(model)) == {by_id[id(p)] for p in params}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(by_id[id(p)] for p in params)
    idx, targets = batch()
    np.testing.assert_array_equal(logits_of(model, idx), logits_of(base_model(base, device), idx))

    opt = AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(5):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0] - 0.05
    for name, a in base.items():  # every base weight bit-identical, and never given a gradient
        np.testing.assert_array_equal(cpu(model.state_dict()[name]), a, err_msg=name)
    assert all(p.grad is None for name, p in model.named_parameters() if name in base)
    assert all(np.any(cpu(p.data)) for p in params[1::2])  # every B moved away from zero

    wrapped_logits = logits_of(model, idx)
    assert merge_lora(model) is model
    assert model.lora is None and set(model.state_dict()) == names_before
    assert all(type(m) is not nn.LoRALinear for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    merged_logits = logits_of(model, idx)
    np.testing.assert_allclose(merged_logits, wrapped_logits, rtol=1e-5,
                               atol=1e-5 * np.abs(wrapped_logits).max())
    assert np.abs(merged_logits - logits_of(base_model(base, device), idx)).max() > 1e-3


@pytest.mark.parametrize("options", [dict(norm_position="post", positions="sinusoidal"),
                                     dict(positions="none", init="fan_in")])
def test_lora_on_post_norm_and_other_positions_trains_merges_and_decodes(options):
    model = tiny_gpt(**options)
    params = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    idx, targets = batch()
    opt = AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    wrapped = logits_of(model, idx)
    merge_lora(model)
    np.testing.assert_allclose(logits_of(model, idx), wrapped, rtol=1e-5,
                               atol=1e-5 * np.abs(wrapped).max())
    with no_grad():  # the KV cache, one position at a time, gives the full forward's logits
        cache = model.new_cache(4)
        steps = [model(idx[:, t:t + 1], cache=cache)[0].numpy() for t in range(16)]
    np.testing.assert_allclose(np.concatenate(steps, 1), logits_of(model, idx), rtol=1e-4,
                               atol=1e-5)


def base_model(state, device="cpu"):
    """A fresh unwrapped tiny GPT holding `state`."""
    model = tiny_gpt(seed=99, device=device)
    model.load_state_dict(state)
    return model


def test_adapter_gradients_are_the_same_with_activation_checkpointing():
    idx, targets = batch()
    grads = []
    for recompute in (False, True):
        model = tiny_gpt()
        params = apply_lora(model, LoRAConfig(rank=2))
        for p in params[1::2]:  # B != 0, so every gradient of A is non-zero too
            p.data = np.random.default_rng(4).standard_normal(p.shape).astype(np.float32) * 0.1
        model.checkpoint_blocks = recompute
        _, loss = model(idx, targets)
        loss.backward()
        grads.append([p.grad for p in params])
    for plain, recomputed in zip(*grads):
        assert np.any(plain)
        np.testing.assert_allclose(recomputed, plain, rtol=1e-5, atol=1e-7)


def test_apply_lora_refuses_a_wrapped_model_and_targets_that_match_nothing():
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=2, targets=("wq",)))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))
    gelu = tiny_gpt(flavour="gpt2")  # its MLP has no w3
    with pytest.raises(ValueError, match=r"targets \['w3'\] match no nn.Linear"):
        apply_lora(gelu, LoRAConfig(rank=2, targets=("w3",)))
    assert all(p.requires_grad for p in gelu.parameters())  # refused before changing anything
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        merge_lora(gelu)


def test_adapters_round_trip_through_a_file(tmp_path):
    model = tiny_gpt()
    params = apply_lora(model, LoRAConfig(rank=3, alpha=5, targets=("wq", "wv", "w2")))
    rng = np.random.default_rng(3)
    for p in params:
        p.data = rng.standard_normal(p.shape).astype(np.float32) * 0.1
    path = tmp_path / "adapters.safetensors"
    save_adapters(path, model, extra_meta={"base": "abc123"})

    stored = safetensors.load_file(path)  # the file holds only the adapters
    assert set(stored) == set(lora_state_dict(model))
    config, extra, arrays = load_adapters(path)
    assert config == LoRAConfig(rank=3, alpha=5, targets=("wq", "wv", "w2"))
    assert extra == {"base": "abc123"}
    for name, a in lora_state_dict(model).items():
        np.testing.assert_array_equal(arrays[name], a)

    fresh = tiny_gpt()  # the same base weights, no adapters yet
    assert load_adapters_into(fresh, path) == {"base": "abc123"}
    assert fresh.lora == config
    idx = batch()[0]
    np.testing.assert_array_equal(logits_of(fresh, idx), logits_of(model, idx))
    load_adapters_into(fresh, path)  # into an already wrapped model of the same config
    np.testing.assert_array_equal(logits_of(fresh, idx), logits_of(model, idx))

    other = tiny_gpt()
    apply_lora(other, LoRAConfig(rank=3, alpha=6, targets=("wq", "wv", "w2")))
    with pytest.raises(ValueError, match="adapters.safetensors: adapters of config"):
        load_adapters_into(other, path)


def test_adapters_that_do_not_fit_the_model_are_refused_before_any_change(tmp_path):
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=2, targets=("wq",)))
    path = tmp_path / "a.safetensors"
    save_adapters(path, model)
    wider = tiny_gpt(d_model=48)
    with pytest.raises(ValueError, match=r"a.safetensors: array 'blocks.0.attn.wq.lora_A' has shape "
                                         r"\(2, 32\), the model's layer needs \(2, 48\)"):
        load_adapters_into(wider, path)
    assert getattr(wider, "lora", None) is None
    assert all(type(m) is not nn.LoRALinear for m in wider.modules())
    deeper = tiny_gpt(n_layers=3)
    with pytest.raises(ValueError, match=r"missing \['blocks.2.attn.wq.lora_A', 'blocks.2.attn.wq.lora_B'\]"):
        load_adapters_into(deeper, path)


def test_foreign_and_corrupted_files_are_refused_naming_the_file(tmp_path):
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=2, targets=("wq",)))
    good = tmp_path / "good.safetensors"
    save_adapters(good, model)
    data = good.read_bytes()

    weights = tmp_path / "weights.safetensors"  # a model file, not adapters
    safetensors.save_file({k: np.asarray(v) for k, v in tiny_gpt().state_dict().items()}, weights)
    with pytest.raises(ValueError, match="weights.safetensors: not a LoRA adapter file"):
        load_adapters(weights)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated.safetensors: tensor .* does not fit"):
        load_adapters_into(tiny_gpt(), truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_adapters(garbage)

    # an adapter file whose arrays are not what its config says: rank 2 config, rank 3 array
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    bad = tmp_path / "bad.safetensors"
    safetensors.save_file({"blocks.0.attn.wq.lora_A": np.zeros((3, 32), np.float32),
                           "blocks.0.attn.wq.lora_B": np.zeros((32, 3), np.float32)}, bad, meta)
    with pytest.raises(ValueError, match=r"bad.safetensors: array 'blocks.0.attn.wq.lora_A' has shape "
                                         r"\(3, 32\), want \(rank, in\) with rank 2"):
        load_adapters(bad)
    stray = tmp_path / "stray.safetensors"
    safetensors.save_file({"tok_emb.weight": np.zeros((64, 32), np.float32)}, stray, meta)
    with pytest.raises(ValueError, match="stray.safetensors: array 'tok_emb.weight' is not the lora_A/lora_B"):
        load_adapters(stray)
