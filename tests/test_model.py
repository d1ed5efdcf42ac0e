"""The transformer: configuration errors, causality, RoPE, GQA, gradients, init, KV cache.

Parity with PyTorch lives in test_model_torch.py, checkpoint loading in test_model_hf.py.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import autograd
from autograd import Tensor, gradcheck, no_grad
from tinyllm.model import GPT, PRESETS, ModelConfig
from tinyllm.model import MLP, Block, CausalSelfAttention
from tinyllm.rope import rope, rope_tables

LLAMA = dict(positions="rope", norm="rms", mlp="swiglu", bias=False)
GPT2 = dict(positions="learned", norm="layer", mlp="gelu", bias=True)
FLAVOURS = {"llama": LLAMA, "gpt2": GPT2}
# the design choices of ModelConfig beyond the two flavours (see tinyllm/model.py)
FLAVOURS.update({
    "post": dict(LLAMA, norm_position="post"),
    "post-gpt2": dict(GPT2, norm_position="post"),
    "sinusoidal": dict(LLAMA, positions="sinusoidal"),
    "learned-llama": dict(LLAMA, positions="learned"),
    "nopos": dict(GPT2, positions="none"),
    "fan_in": dict(LLAMA, init="fan_in"),
})
VARIANTS = ["post", "post-gpt2", "sinusoidal", "learned-llama", "nopos", "fan_in"]


def tiny(flavour="llama", **kw):
    settings = dict(vocab_size=23, context_length=16, d_model=16, n_layers=2, n_heads=4,
                    dtype="float64", tie_embeddings=False)
    settings.update(FLAVOURS[flavour])
    settings.update(kw)
    return ModelConfig(**settings)


def model_for(cfg, seed=0):
    autograd.manual_seed(seed)
    model = GPT(cfg)
    # random (not init-valued) norm weights and biases so that every path is exercised
    rng = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            p.data = p.data + 0.1 * rng.standard_normal(p.shape)
    return model


# ---- configuration and input errors ---------------------------------------------------------

def test_bad_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_heads=4"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        ModelConfig(d_model=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="norm must be one of"):
        ModelConfig(norm="batch")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        GPT.from_preset("nope")
    with pytest.raises(ValueError, match="unknown fields"):
        GPT.from_preset("laptop", width=3)


def test_bad_idx_errors():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="longer than the context"):
        model(np.zeros((1, 17), dtype=np.int64))
    with pytest.raises(TypeError, match="integer token ids, not float32"):
        model(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model(np.zeros(4, dtype=np.int64))
    with pytest.raises(IndexError, match="token id 23 is out of range"):
        model(np.full((1, 4), 23))
    with pytest.raises(ValueError, match="targets of shape"):
        model(np.zeros((1, 4), dtype=np.int64), np.zeros((1, 3), dtype=np.int64))


def test_presets_and_accounting():
    assert {"laptop", "shakespeare-char", "gpt2-small", "llama-shakespeare-char",
            "llama-gpt2-small"} <= set(PRESETS)
    laptop = GPT.from_preset("laptop", vocab_size=1000)
    assert 0.7e6 < laptop.num_params(non_embedding=False) < 1.3e6
    cfg = laptop.config
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.bias) == ("rope", "rms", "swiglu", False)
    sc = GPT.from_preset("shakespeare-char")
    c = sc.config
    assert (c.n_layers, c.n_heads, c.d_model, c.context_length) == (6, 6, 384, 256)
    assert (c.positions, c.norm, c.mlp) == ("learned", "layer", "gelu")
    # counted by hand: 6 blocks of 12 d^2 (no biases) + 2 LayerNorm weights each, final norm,
    # tied token embeddings 65 x 384; position embeddings 256 x 384 are not "non-embedding"
    d = 384
    per_block = 12 * d * d + 2 * d
    assert sc.num_params(non_embedding=False) == 6 * per_block + d + 65 * d + 256 * d
    assert sc.num_params() == 6 * per_block + d + 65 * d
    assert sc.flops_per_token() == 6 * sc.num_params() + 12 * 6 * 256 * d
    llama = GPT.from_preset("shakespeare-char", flavour="llama", n_kv_heads=2)
    assert (llama.config.positions, llama.config.n_kv_heads) == ("rope", 2)
    assert llama.blocks[0].attn.wk.weight.shape == (2 * 64, 384)


# ---- causality ------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["llama", "gpt2"] + VARIANTS)
@given(data=st.data())
def test_causality(flavour, data):
    model = _causal_models[flavour]
    T = data.draw(st.integers(2, 16))
    j = data.draw(st.integers(0, T - 1))
    idx = np.array([data.draw(st.lists(st.integers(0, 22), min_size=T, max_size=T))])
    changed = idx.copy()
    changed[0, j] = (idx[0, j] + data.draw(st.integers(1, 22))) % 23
    with no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    np.testing.assert_array_equal(a.data[:, :j], b.data[:, :j])
    assert not np.allclose(a.data[:, j], b.data[:, j])  # position j itself does see the change


_causal_models = {f: model_for(tiny(f, n_kv_heads=2)) for f in FLAVOURS}


# ---- RoPE -----------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["half", "interleaved"])
@given(s=st.integers(0, 40), t=st.integers(0, 40), shift=st.integers(0, 40), seed=st.integers(0, 99))
def test_rope_scores_depend_only_on_relative_offset(style, s, t, shift, seed):
    D = 8
    cos, sin = rope_tables(128, D)
    rng = np.random.default_rng(seed)
    q, k = Tensor(rng.standard_normal((1, D))), Tensor(rng.standard_normal((1, D)))

    def score(ps, pt):
        rq = rope(q, cos[ps:ps + 1], sin[ps:ps + 1], style).data
        rk = rope(k, cos[pt:pt + 1], sin[pt:pt + 1], style).data
        return float((rq @ rk.T)[0, 0])

    assert score(s, t) == pytest.approx(score(s + shift, t + shift), rel=1e-12, abs=1e-12)
    # and the rotation keeps lengths (it is orthogonal)
    assert np.linalg.norm(rope(q, cos[s:s + 1], sin[s:s + 1], style).data) == pytest.approx(
        np.linalg.norm(q.data), rel=1e-12)


def test_rope_half_matches_complex_rotation():
    # rotate-half pairs channel i with i + D/2; rotating pair i by t*theta_i is multiplying the
    # complex number x_i + i x_{i+D/2} by exp(i t theta_i)
    D, T = 6, 5
    x = np.random.default_rng(0).standard_normal((2, T, D))
    cos, sin = rope_tables(T, D, theta=100.0)
    theta = 100.0 ** (-np.arange(0, D, 2) / D)
    z = (x[..., :D // 2] + 1j * x[..., D // 2:]) * np.exp(1j * np.arange(T)[:, None] * theta)
    want = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(rope(Tensor(x), cos, sin, "half").data, want, atol=1e-14)
    zi = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * np.arange(T)[:, None] * theta)
    want_i = np.stack([zi.real, zi.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(rope(Tensor(x), cos, sin, "interleaved").data, want_i, atol=1e-14)


# ---- grouped-query attention ----------------------------------------------------------------

def _numpy_mha(x, wq, wk, wv, wo, H):
    """Plain multi-head causal attention, one head at a time (no rope, no biases)."""
    B, T, d = x.shape
    D = wq.shape[0] // H
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    heads = []
    for h in range(H):
        sl = slice(h * D, (h + 1) * D)
        s = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / math.sqrt(D)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        heads.append(p @ v[..., sl])
    return np.concatenate(heads, -1) @ wo.T


def test_attention_with_as_many_kv_heads_as_heads_is_plain_mha():
    cfg = tiny(positions="learned", bias=False, n_kv_heads=4)
    attn = model_for(cfg).blocks[0].attn
    x = np.random.default_rng(1).standard_normal((2, 7, 16))
    got = attn(Tensor(x)).data
    want = _numpy_mha(x, attn.wq.weight.data, attn.wk.weight.data, attn.wv.weight.data,
                      attn.wo.weight.data, 4)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_gqa_equals_mha_with_repeated_kv_weights(flavour):
    gqa = model_for(tiny(flavour, n_heads=4, n_kv_heads=2))
    mha = model_for(tiny(flavour, n_heads=4, n_kv_heads=4), seed=5)
    state = dict(gqa.state_dict())
    D, G = 4, 2
    for n in range(2):
        for w in ("wk", "wv"):
            for kind in ("weight", "bias"):
                key = f"blocks.{n}.attn.{w}.{kind}"
                if key in state:  # query head h uses kv head h // G
                    a = state[key].reshape(2, D, *state[key].shape[1:])
                    state[key] = np.repeat(a, G, axis=0).reshape(8 * D // 2, *a.shape[2:])
    mha.load_state_dict(state)
    idx = np.random.default_rng(2).integers(0, 23, (2, 9))
    np.testing.assert_allclose(mha(idx)[0].data, gqa(idx)[0].data, rtol=1e-12, atol=1e-13)


# ---- gradients ------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_gradcheck_rope(style):
    cos, sin = rope_tables(5, 6, theta=50.0)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 5, 6)), requires_grad=True)
    assert gradcheck(lambda x: rope(x, cos, sin, style), [x])


def _check_module(module, x, *extra):
    params = [p for _, p in module.named_parameters()]
    assert gradcheck(lambda x, *ps: module(x, *extra), [x, *params], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("flavour", ["llama", "gpt2", "post", "post-gpt2"])
def test_gradcheck_layers(flavour):
    cfg = tiny(flavour, d_model=8, n_heads=2, n_kv_heads=1, d_ff=12)
    model = model_for(cfg)
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((2, 5, 8)), requires_grad=True)
    tables = model.rope.tables(0, 5, np.float64) if model.rope is not None else None
    block = model.blocks[0]
    assert isinstance(block.attn, CausalSelfAttention) and isinstance(block.mlp, MLP)
    _check_module(block.attn, x, tables)
    _check_module(block.mlp, x)
    _check_module(block.norm1, x)
    assert isinstance(block, Block)
    _check_module(block, x, tables)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"] + VARIANTS)
def test_gradcheck_whole_model_loss(flavour):
    cfg = tiny(flavour, d_model=8, n_heads=2, n_kv_heads=1, d_ff=8, n_layers=1, vocab_size=7,
               context_length=6)
    model = model_for(cfg)
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 7, (2, 5))
    targets = rng.integers(0, 7, (2, 5))
    targets[0, 1] = -100
    params = model.parameters()
    assert gradcheck(lambda *ps: model(idx, targets)[1], params, atol=1e-7, rtol=1e-6)


# ---- initialization -------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_init_keeps_deep_residual_stream_stable_and_loss_at_log_vocab(flavour):
    V = 512
    cfg = ModelConfig(vocab_size=V, context_length=32, d_model=64, n_layers=24, n_heads=4,
                      **FLAVOURS[flavour])
    autograd.manual_seed(0)
    model = GPT(cfg)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, V, (4, 32)), rng.integers(0, V, (4, 32))
    stds = []
    with no_grad():
        x = model.tok_emb(idx)
        if model.pos_emb is not None:
            x = x + model.pos_emb.weight[:32]
        tables = model.rope.tables(0, 32, x.dtype) if model.rope is not None else None
        for block in model.blocks:
            x = block(x, tables)
            stds.append(float(x.data.std()))
        _, loss = model(idx, targets)
    assert max(stds) <= 2 * stds[0] and min(stds) >= stds[0] / 2, stds
    assert abs(loss.item() - math.log(V)) < 0.1
    # residual output projections are scaled down by 1/sqrt(2 n_layers)
    wo = model.blocks[3].attn.wo.weight.data
    assert float(wo.std()) == pytest.approx(0.02 / math.sqrt(48), rel=0.1)
    assert float(model.blocks[3].attn.wq.weight.data.std()) == pytest.approx(0.02, rel=0.05)


# ---- KV cache -------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour,kv", [("llama", 4), ("llama", 2), ("gpt2", 4), ("gpt2", 1)]
                         + [(v, 2) for v in VARIANTS])
def test_kv_cache_step_by_step_equals_full_forward(flavour, kv):
    model = model_for(tiny(flavour, n_kv_heads=kv))
    idx = np.random.default_rng(6).integers(0, 23, (3, 14))
    with no_grad():
        full, _ = model(idx)
        cache = model.new_cache(3)
        parts = [model(idx[:, :4], cache=cache)[0].data]  # a prompt, then one token at a time
        for t in range(4, 14):
            parts.append(model(idx[:, t:t + 1], cache=cache)[0].data)
        assert cache.length == 14
        assert cache.k[0].shape == (3, kv, 16, 4)
        np.testing.assert_allclose(np.concatenate(parts, 1), full.data, rtol=1e-10, atol=1e-12)
        # crop rewinds: recomputing the last positions gives the same logits again
        cache.crop(10)
        again, _ = model(idx[:, 10:14], cache=cache)
        np.testing.assert_allclose(again.data, full.data[:, 10:14], rtol=1e-10, atol=1e-12)
        last, _ = model(idx[:, :5], cache=model.new_cache(3), last_only=True)
        np.testing.assert_allclose(last.data[:, 0], full.data[:, 4], rtol=1e-10, atol=1e-12)
        with pytest.raises(ValueError, match="longer than the context|exceed the cache"):
            model(idx[:, :4], cache=cache)


def test_kv_cache_with_grad_keeps_new_positions_differentiable():
    model = model_for(tiny("llama", n_kv_heads=2))
    idx = np.random.default_rng(7).integers(0, 23, (2, 8))
    targets = np.random.default_rng(8).integers(0, 23, (2, 3))
    full, _ = model(idx)
    loss_full = autograd.cross_entropy(full[:, 5:], targets)
    loss_full.backward()
    want = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    cache = model.new_cache(2)
    with no_grad():
        model(idx[:, :5], cache=cache)
    _, loss = model(idx[:, 5:], targets, cache=cache)
    assert loss.item() == pytest.approx(loss_full.item(), rel=1e-12)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    # Weights used only at the new positions get the full gradient; the cached prefix is a
    # constant, so the keys/values of the last block see only the new positions' share.
    for name in ("lm_head.weight", "norm_f.weight", "blocks.1.mlp.w2.weight",
                 "blocks.1.norm2.weight", "blocks.1.attn.wq.weight"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12)
    assert not np.allclose(got["blocks.1.attn.wk.weight"], want["blocks.1.attn.wk.weight"])


@pytest.mark.parametrize("flavour,tied", [("llama", False), ("gpt2", True)])
def test_loss_without_logits_equals_loss_from_logits(flavour, tied):
    model = model_for(tiny(flavour, tie_embeddings=tied, n_kv_heads=2))
    rng = np.random.default_rng(9)
    idx, targets = rng.integers(0, 23, (3, 10)), rng.integers(0, 23, (3, 10))
    targets[1, :4] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        logits, loss = model(idx, targets, return_logits=return_logits)
        loss.backward()
        assert (logits is None) == (not return_logits)
        results.append((loss.item(), {n: p.grad.copy() for n, p in model.named_parameters()}))
    (want_loss, want), (got_loss, got) = results
    assert got_loss == pytest.approx(want_loss, rel=1e-10)
    assert set(got) == set(want) and ("lm_head.weight" in got) != tied
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


# ---- design choices: norm position, positions, init schemes --------------------------------

def _stats(model):
    return {n: (float(p.data.mean()), float(p.data.std()), float(np.abs(p.data).max()))
            for n, p in model.named_parameters()}


def test_init_normal_draws_every_weight_at_init_std():
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=6, n_heads=4, init="normal",
                      tie_embeddings=False, **GPT2)
    autograd.manual_seed(0)
    stats = _stats(GPT(cfg))
    for name in ("tok_emb.weight", "pos_emb.weight", "lm_head.weight", "blocks.5.attn.wq.weight",
                 "blocks.5.attn.wo.weight", "blocks.5.mlp.w1.weight", "blocks.5.mlp.w2.weight"):
        mean, std, _ = stats[name]
        assert std == pytest.approx(0.02, rel=0.03), name  # wo, w2 not scaled down
        assert abs(mean) < 0.002, name
    assert stats["blocks.5.attn.wo.bias"] == (0.0, 0.0, 0.0)
    assert stats["blocks.5.norm1.weight"][:2] == (1.0, 0.0)


def test_init_fan_in_is_pytorchs_default():
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=3, n_heads=4, init="fan_in",
                      tie_embeddings=False, **GPT2)
    autograd.manual_seed(0)
    model = GPT(cfg)
    stats = _stats(model)
    # uniform(-b, b), b = 1/sqrt(fan_in): std b/sqrt(3), every value inside +-b, biases too
    for name, fan_in in (("blocks.2.attn.wq.weight", 128), ("blocks.2.attn.wo.weight", 128),
                         ("blocks.2.mlp.w2.weight", 512), ("blocks.2.mlp.w2.bias", 512),
                         ("lm_head.weight", 128)):
        mean, std, top = stats[name]
        b = 1 / math.sqrt(fan_in)
        assert std == pytest.approx(b / math.sqrt(3), rel=0.1 if "bias" in name else 0.03), name
        assert top <= b and top > 0.95 * b, name
    for name in ("tok_emb.weight", "pos_emb.weight"):  # nn.Embedding: normal(0, 1)
        assert stats[name][1] == pytest.approx(1.0, rel=0.02), name


def test_init_gpt2_is_the_default_and_old_configs_load_as_before():
    cfg = ModelConfig()
    assert (cfg.norm_position, cfg.positions, cfg.init) == ("pre", "rope", "gpt2")
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("norm_position", "init")}
    assert ModelConfig.from_dict(old) == cfg
    for bad, msg in ((dict(norm_position="mid"), "norm_position must be one of"),
                     (dict(positions="alibi"), "positions must be one of"),
                     (dict(init="xavier"), "init must be one of")):
        with pytest.raises(ValueError, match=msg):
            ModelConfig(**bad)


def test_post_norm_block_output_is_normalized_and_there_is_no_final_norm():
    cfg = tiny("post", n_layers=3)
    autograd.manual_seed(0)
    model = GPT(cfg)  # norm weights 1: every block's output has RMS 1 at each position
    assert model.norm_f is None and not any("norm_f" in n for n in model.state_dict())
    x = Tensor(np.random.default_rng(0).standard_normal((2, 5, 16)) * 7)
    tables = model.rope.tables(0, 5, np.float64)
    y = model.blocks[0](x, tables).data
    np.testing.assert_allclose(np.sqrt((y ** 2).mean(-1)), 1.0, rtol=1e-4)
    # and it is norm2(h + mlp(h)) with h = norm1(x + attn(x)), by hand
    b = model.blocks[0]
    h = b.norm1(x + b.attn(x, tables))
    np.testing.assert_allclose(y, b.norm2(h + b.mlp(h)).data, rtol=1e-12)
    with no_grad():
        hidden = model.hidden(np.arange(5)[None])
    np.testing.assert_allclose(np.sqrt((hidden.data ** 2).mean(-1)), 1.0, rtol=1e-4)


def test_sinusoidal_positions_are_vaswanis_table_at_the_embeddings_scale():
    cfg = tiny("sinusoidal", d_model=32, context_length=64, n_heads=4)
    autograd.manual_seed(0)
    model = GPT(cfg)
    assert model.rope is None and model.pos_emb is None
    assert not any("pos" in n for n in model.state_dict())  # a fixed table: nothing to save
    table = model.pos_table.rows(0, 64, np.float64)
    t, i = 37, 5  # PE(t, 2i) = sin(t / 10000^(2i/d)), PE(t, 2i+1) = cos(...), times the scale
    scale = math.sqrt(2) * cfg.init_std
    assert table[t, 2 * i] == pytest.approx(scale * math.sin(t / 10000 ** (2 * i / 32)), rel=1e-12)
    assert table[t, 2 * i + 1] == pytest.approx(scale * math.cos(t / 10000 ** (2 * i / 32)),
                                                rel=1e-12)
    assert float(np.sqrt((table ** 2).mean())) == pytest.approx(cfg.init_std, rel=0.05)
    # the input of block 0 is token embedding + table row
    idx = np.array([[3, 1, 4, 1, 5]])
    seen = []
    model.blocks[0].norm1.forward = lambda x, f=model.blocks[0].norm1.forward: (
        seen.append(x.data.copy()), f(x))[1]
    with no_grad():
        model(idx)
    np.testing.assert_allclose(seen[0], model.tok_emb.weight.data[idx] + table[:5], rtol=1e-12)


def test_no_positions_model_sees_a_bag_of_tokens_at_the_first_layer():
    # without positions one layer's output at position t depends only on the token at t and
    # the multiset of tokens 0..t: swapping two earlier tokens leaves the last position alone
    model = model_for(tiny("nopos", n_layers=1))
    with no_grad():
        a, _ = model(np.array([[1, 2, 3, 4, 5]]))
        b, _ = model(np.array([[2, 1, 3, 4, 5]]))
    np.testing.assert_allclose(a.data[0, 4], b.data[0, 4], rtol=1e-10)
    assert not np.allclose(a.data[0, 0], b.data[0, 0])
    rope_model = model_for(tiny("llama", n_layers=1))
    with no_grad():
        ra, _ = rope_model(np.array([[1, 2, 3, 4, 5]]))
        rb, _ = rope_model(np.array([[2, 1, 3, 4, 5]]))
    assert not np.allclose(ra.data[0, 4], rb.data[0, 4])  # with positions, order matters
