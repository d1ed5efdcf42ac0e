"""Parity with PyTorch: an equivalent model written here in plain torch, given the same
weights, must give the same logits, loss and every parameter gradient.

The reference is written from the usual definitions (F.layer_norm, an explicit RMSNorm,
softmax attention with a lower-triangular mask, kv heads repeated for GQA, RoPE as HF Llama's
rotate_half for "half" and as Meta's complex multiplication for "interleaved"), sharing no
code with tinyllm.
"""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import autograd  # noqa: E402
from tinyllm.model import GPT, ModelConfig  # noqa: E402
from tinyllm.safetensors import save_file  # noqa: E402

LLAMA = dict(positions="rope", norm="rms", mlp="swiglu", bias=False)
GPT2 = dict(positions="learned", norm="layer", mlp="gelu", bias=True)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def torch_rope(x, cfg, T):
    D = x.shape[-1]
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    if cfg.rope_style == "half":  # HF Llama
        emb = torch.cat((freqs, freqs), dim=-1)
        return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)
    # Meta's Llama: pairs (2i, 2i+1) as complex numbers times exp(i t theta_i)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], D // 2, 2).contiguous())
    out = torch.view_as_real(xc * torch.polar(torch.ones_like(freqs), freqs))
    return out.reshape(x.shape).to(x.dtype)


def torch_forward(W, cfg, idx, targets):
    """The reference transformer on a dict of torch tensors named as in tinyllm."""
    B, T = idx.shape
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads

    def norm(x, name):
        if cfg.norm == "layer":
            return F.layer_norm(x, (cfg.d_model,), W[name + ".weight"], W.get(name + ".bias"),
                                cfg.norm_eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * W[name + ".weight"]

    def lin(x, name):
        return F.linear(x, W[name + ".weight"], W.get(name + ".bias"))

    x = W["tok_emb.weight"][idx]
    if cfg.positions == "learned":
        x = x + W["pos_emb.weight"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for n in range(cfg.n_layers):
        p = f"blocks.{n}."
        h = norm(x, p + "norm1")
        q = lin(h, p + "attn.wq").view(B, T, H, D).transpose(1, 2)
        k = lin(h, p + "attn.wk").view(B, T, Hkv, D).transpose(1, 2)
        v = lin(h, p + "attn.wv").view(B, T, Hkv, D).transpose(1, 2)
        if cfg.positions == "rope":
            q, k = torch_rope(q, cfg, T), torch_rope(k, cfg, T)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + lin(y, p + "attn.wo")
        h = norm(x, p + "norm2")
        if cfg.mlp == "swiglu":
            m = F.silu(lin(h, p + "mlp.w1")) * lin(h, p + "mlp.w3")
        else:
            m = F.gelu(lin(h, p + "mlp.w1"), approximate="tanh")
        x = x + lin(m, p + "mlp.w2")
    x = norm(x, "norm_f")
    head = W["tok_emb.weight"] if cfg.tie_embeddings else W["lm_head.weight"]
    logits = F.linear(x, head)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return logits, loss


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def perturbed_model(cfg, seed=0):
    autograd.manual_seed(seed)
    model = GPT(cfg)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():  # norm weights and biases away from 1 and 0
        if name.endswith("bias") or "norm" in name:
            p.data = (p.data + 0.1 * rng.standard_normal(p.shape)).astype(p.dtype)
    return model


def compare(cfg, tol, B=3, T=12, seed=0):
    model = perturbed_model(cfg, seed)
    rng = np.random.default_rng(seed + 10)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :3] = -100  # ignored positions
    logits, loss = model(idx, targets)
    loss.backward()

    W = {n: torch.tensor(p.data, requires_grad=True) for n, p in model.named_parameters()}
    t_logits, t_loss = torch_forward(W, cfg, torch.tensor(idx), torch.tensor(targets))
    t_loss.backward()

    errors = {"logits": rel_err(logits.data, t_logits.detach().numpy()),
              "loss": rel_err(loss.data, t_loss.detach().numpy())}
    scale = max(float(np.abs(W[n].grad.numpy()).max()) for n in W)
    for n, p in model.named_parameters():
        if n.endswith("attn.wk.bias"):
            # exactly zero in exact arithmetic (adding q.b_k to a whole row of scores leaves
            # the softmax unchanged): both sides hold rounding noise, so compare to the scale
            # of the other gradients
            errors[n] = float(np.abs(p.grad - W[n].grad.numpy()).max()) / scale
        else:
            errors[n] = rel_err(p.grad, W[n].grad.numpy())
    worst = max(errors, key=errors.get)
    assert errors[worst] < tol, f"{worst}: relative error {errors[worst]:.3g} (tolerance {tol})"
    return errors


CASES = {
    "gpt2": dict(GPT2),
    "gpt2-gqa-untied": dict(GPT2, n_kv_heads=2, tie_embeddings=False),
    "llama": dict(LLAMA),
    "llama-gqa": dict(LLAMA, n_kv_heads=2),
    "llama-mqa-interleaved-untied": dict(LLAMA, n_kv_heads=1, rope_style="interleaved",
                                         tie_embeddings=False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_parity_with_torch(case, dtype, tol):
    cfg = ModelConfig(vocab_size=37, context_length=16, d_model=32, n_layers=2, n_heads=4,
                      d_ff=48, dtype=dtype, **CASES[case])
    compare(cfg, tol)


# ---- Hugging Face checkpoints against the reference ------------------------------------------

def to_hf_gpt2(W, cfg):
    """Our names -> HF GPT-2 names, Conv1D weights stored (in, out)."""
    hf = {"transformer.wte.weight": W["tok_emb.weight"], "transformer.wpe.weight": W["pos_emb.weight"],
          "transformer.ln_f.weight": W["norm_f.weight"], "transformer.ln_f.bias": W["norm_f.bias"]}
    for n in range(cfg.n_layers):
        p, h = f"blocks.{n}.", f"transformer.h.{n}."
        hf[h + "attn.c_attn.weight"] = np.concatenate(
            [W[p + f"attn.w{c}.weight"].T for c in "qkv"], axis=1)
        hf[h + "attn.c_attn.bias"] = np.concatenate([W[p + f"attn.w{c}.bias"] for c in "qkv"])
        hf[h + "attn.bias"] = np.tril(np.ones((1, 1, cfg.context_length, cfg.context_length)))
        for ours, theirs in (("attn.wo", "attn.c_proj"), ("mlp.w1", "mlp.c_fc"), ("mlp.w2", "mlp.c_proj")):
            hf[h + theirs + ".weight"] = W[p + ours + ".weight"].T
            hf[h + theirs + ".bias"] = W[p + ours + ".bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            hf[h + theirs + ".weight"] = W[p + ours + ".weight"]
            hf[h + theirs + ".bias"] = W[p + ours + ".bias"]
    return hf


def to_hf_llama(W, cfg):
    hf = {"model.embed_tokens.weight": W["tok_emb.weight"], "model.norm.weight": W["norm_f.weight"]}
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = W["lm_head.weight"]
    names = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm",
             "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
             "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}
    for n in range(cfg.n_layers):
        for ours, theirs in names.items():
            hf[f"model.layers.{n}.{theirs}.weight"] = W[f"blocks.{n}.{ours}.weight"]
    return hf


def write_hf(tmp_path, cfg, W):
    if cfg.positions == "learned":
        hf_cfg = dict(model_type="gpt2", vocab_size=cfg.vocab_size, n_positions=cfg.context_length,
                      n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                      layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new")
        tensors = to_hf_gpt2(W, cfg)
    else:
        hf_cfg = dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                      num_key_value_heads=cfg.n_kv_heads, intermediate_size=cfg.d_ff,
                      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                      max_position_embeddings=cfg.context_length,
                      tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu")
        tensors = to_hf_llama(W, cfg)
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, tmp_path / "model.safetensors")


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_from_pretrained_matches_reference(tmp_path, flavour):
    extra = dict(GPT2, tie_embeddings=True) if flavour == "gpt2" else dict(
        LLAMA, n_kv_heads=2, tie_embeddings=False, rope_theta=500.0)
    cfg = ModelConfig(vocab_size=41, context_length=16, d_model=32, n_layers=2, n_heads=4,
                      d_ff=128 if flavour == "gpt2" else 48, norm_eps=1e-5, **extra)
    rng = np.random.default_rng(3)
    names = dict(perturbed_model(cfg).named_parameters())
    W = {n: (0.2 * rng.standard_normal(p.shape) + (1.0 if "norm" in n and n.endswith("weight") else 0))
         .astype(np.float32) for n, p in names.items()}
    write_hf(tmp_path, cfg, W)
    model = GPT.from_pretrained(tmp_path, dtype="float64")
    assert model.config.n_kv_heads == cfg.n_kv_heads and model.config.positions == cfg.positions
    idx = rng.integers(0, 41, (2, 16))
    targets = rng.integers(0, 41, (2, 16))
    logits, loss = model(idx, targets)
    TW = {n: torch.tensor(a, dtype=torch.float64) for n, a in W.items()}
    t_logits, t_loss = torch_forward(TW, cfg, torch.tensor(idx), torch.tensor(targets))
    assert rel_err(logits.data, t_logits.numpy()) < 1e-10
    assert rel_err(loss.data, t_loss.numpy()) < 1e-10
