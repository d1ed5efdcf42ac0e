"""The decoder-only transformer (GPT), in the GPT-2 or the Llama flavour.

    logits = head(norm_f(blocks(embed(idx) [+ positions])))
    block:   x = x + attn(norm1(x));  x = x + mlp(norm2(x))          norm_position="pre"
             x = norm1(x + attn(x));  x = norm2(x + mlp(x))          norm_position="post"
    attn:    causal multi-head attention, grouped-query when n_kv_heads < n_heads
    mlp:     w2(gelu(w1 x))  or  w2(silu(w1 x) * w3 x)  (SwiGLU)

Design choices (ModelConfig), each usable with the others:

    norm_position  "pre" (GPT-2, Llama): the residual stream is never normalized, only each
                   branch's input, and a final norm_f before the head.  "post" (the original
                   Transformer, GPT-1): the sum is normalized after each branch; no norm_f (the
                   last block's output is already normalized).
    positions      "rope": q and k rotated by the position (rope.py).  "learned": a trained
                   table added to the token embeddings.  "sinusoidal": the fixed table of
                   Vaswani et al., sin/cos of t / 10000^(2i/d), added to the token embeddings
                   and scaled to their init RMS (at amplitude 1 it would drown embeddings drawn
                   at std 0.02; the original instead scales the embeddings up by sqrt(d)).
                   "none": no position signal; only the causal mask tells positions apart.
    init           "gpt2" (below); "normal": every Linear and Embedding weight ~ normal(0,
                   init_std), residual projections included; "fan_in": PyTorch's defaults,
                   Linear weights and biases ~ uniform(+-1/sqrt(fan_in)), Embedding ~ normal(0, 1).

Parameter names in `state_dict()` (they follow the module tree):

    tok_emb.weight                      (vocab_size, d_model)
    pos_emb.weight                      (context_length, d_model), learned positions only
    blocks.N.norm1.weight [.bias]       the attention branch's norm (bias: LayerNorm, bias=True)
    blocks.N.attn.wq.weight [.bias]     (n_heads * head_dim, d_model)
    blocks.N.attn.wk.weight [.bias]     (n_kv_heads * head_dim, d_model)
    blocks.N.attn.wv.weight [.bias]     (n_kv_heads * head_dim, d_model)
    blocks.N.attn.wo.weight [.bias]     (d_model, n_heads * head_dim)
    blocks.N.norm2.weight [.bias]       the MLP branch's norm
    blocks.N.mlp.w1.weight [.bias]      (d_ff, d_model): the GELU MLP's input, SwiGLU's gate
    blocks.N.mlp.w3.weight              (d_ff, d_model): SwiGLU's up projection only
    blocks.N.mlp.w2.weight [.bias]      (d_model, d_ff): the down projection
    norm_f.weight [.bias]               final norm, pre-norm only
    lm_head.weight                      (vocab_size, d_model), absent with tie_embeddings

Initialization "gpt2" (the default; keeps deep pre-norm models stable): every Linear and
Embedding weight ~ normal(0, init_std=0.02); the two projections that write into the residual
stream (attn.wo, mlp.w2) ~ normal(0, 0.02 / sqrt(2 n_layers)), since each of the 2 n_layers
residual branches adds its variance to the stream; biases 0; norm weights 1. Random numbers
come from `autograd.backend.rng("cpu")` (seed with `autograd.manual_seed`), then move to
config.device.

Generation uses a KV cache: `cache = model.new_cache(batch_size)`, then
`model(prompt, cache=cache)` and `model(next_tokens, cache=cache)` step by step; see KVCache.
A block's `probe`, when set, is called with (layer, attention output, MLP output, block
output) in each forward (the training-health monitor reads activations through it).
"""

import math

import numpy as np

from autograd import amp, backend, ops
from autograd.checkpoint import checkpoint
from autograd.nn import Dropout, Embedding, LayerNorm, Linear, Module, RMSNorm
from autograd.tensor import Tensor, is_grad_enabled
from tinyllm.config import FLAVOURS, PRESETS, ModelConfig, preset_config
from tinyllm.rope import RotaryEmbedding, rope

__all__ = ["GPT", "ModelConfig", "KVCache", "PRESETS", "FLAVOURS"]


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding.

    `k[i]`, `v[i]` are layer i's preallocated arrays of shape (B, n_kv_heads, max_len, head_dim)
    (only the kv heads under grouped-query attention); positions 0 .. length-1 are filled.
    A forward with `cache=` treats idx as the next positions (RoPE angles / learned positions
    offset by `length`), writes their keys and values, and attends over all `length + T`
    positions; `length` then grows by T. Every sequence of the batch has the same length.
    `crop(n)` forgets every position from n on (e.g. to rewind); `reset()` empties the cache.
    The cached past is a constant: gradients flow only through the new positions.
    """

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        xp = backend.xp_for_device(device)
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [backend.to_device(xp.zeros(shape, dtype), device) for _ in range(n_layers)]
        self.v = [backend.to_device(xp.zeros(shape, dtype), device) for _ in range(n_layers)]
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0

    def update(self, layer, k, v):
        """Store layer `layer`'s new keys/values (B, Hkv, T, D) at the current position and
        return the keys/values of all positions so far, (B, Hkv, length + T, D)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k.data
        self.v[layer][:, :, start:end] = v.data
        if is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # keep the new positions in the graph; the past is constant
            past_k, past_v = Tensor(self.k[layer][:, :, :start]), Tensor(self.v[layer][:, :, :start])
            return ops.concat([past_k, k], axis=2), ops.concat([past_v, v], axis=2)
        return Tensor(self.k[layer][:, :, :end]), Tensor(self.v[layer][:, :, :end])

    def crop(self, n):
        """Keep only the first n positions."""
        if n < 0:
            raise ValueError(f"KVCache.crop: n must be >= 0, got {n}")
        self.length = min(self.length, n)

    def reset(self):
        self.length = 0


def init_stds(cfg):
    """(std, out_std): the normal std of the Linear weights that read the residual stream and
    of those that write into it (attn.wo, mlp.w2) under cfg.init; None: fan-in uniform."""
    if cfg.init == "fan_in":
        return None, None
    if cfg.init == "normal":
        return cfg.init_std, cfg.init_std
    return cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)


def embedding_std(cfg):
    """Token (and learned position) embeddings ~ normal(0, this)."""
    return 1.0 if cfg.init == "fan_in" else cfg.init_std


def sinusoid_table(n_positions, d):
    """Vaswani et al.'s positions, (n_positions, d) in float64: column 2i holds
    sin(t / 10000^(2i/d)), column 2i+1 the cos of the same angle."""
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(n_positions, dtype=np.float64), inv_freq)
    table = np.empty((n_positions, d))
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : d // 2])
    return table


class SinusoidalPositions(Module):
    """The fixed position table (a buffer: not saved, not trained), scaled by `scale`
    (sqrt(2) x the embeddings' std: each sin/cos column has mean square 1/2)."""

    def __init__(self, n_positions, d, scale, dtype=None, device=None):
        self.scale = scale
        self.table = Tensor(sinusoid_table(n_positions, d) * scale, dtype=dtype or "float32",
                            device=device)

    def rows(self, start, length, dtype):
        """Positions start .. start+length-1 as an array of `dtype`."""
        if self.table.dtype != dtype:  # e.g. after model.to(dtype=...): recompute, do not upcast
            n, d = self.table.shape
            self.table = Tensor(sinusoid_table(n, d) * self.scale, dtype=dtype,
                                device=self.table.device)
        return self.table.data[start:start + length]


class CausalSelfAttention(Module):
    def __init__(self, cfg, layer):
        d, H, Hkv, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std, out_std = init_stds(cfg)
        kw = dict(bias=cfg.bias, dtype=cfg.dtype, device=cfg.device)
        self.wq = Linear(d, H * D, std=std, **kw)
        self.wk = Linear(d, Hkv * D, std=std, **kw)
        self.wv = Linear(d, Hkv * D, std=std, **kw)
        self.wo = Linear(H * D, d, std=out_std, **kw)
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, D
        self.layer, self.dropout, self.rope_style = layer, cfg.dropout, cfg.rope_style
        self.resid_drop = Dropout(cfg.dropout)

    def forward(self, x, rope_tables=None, cache=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        # Under a low-precision mode on the GPU, q, k and v leave their products in the low
        # dtype (amp.activation_dtype): RoPE and attention read and write it. A KV cache keeps
        # the model's dtype, so decoding keeps them in that.
        low = amp.activation_dtype(x) if cache is None else None
        # (B, T, H*D) -> (B, H, T, D): a view, which RoPE and attention read in place
        q = self.wq(x, out_dtype=low).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = self.wk(x, out_dtype=low).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        v = self.wv(x, out_dtype=low).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        if rope_tables is not None:
            q = rope(q, *rope_tables, self.rope_style)
            k = rope(k, *rope_tables, self.rope_style)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = ops.scaled_dot_product_attention(
            q, k, v, causal=True, dropout_p=self.dropout, training=self.training
        )
        y = y.transpose(0, 2, 1, 3).reshape(B, T, H * D)
        return self.resid_drop(self.wo(y))


class MLP(Module):
    def __init__(self, cfg):
        d, f = cfg.d_model, cfg.d_ff
        std, out_std = init_stds(cfg)
        kw = dict(bias=cfg.bias, dtype=cfg.dtype, device=cfg.device)
        self.swiglu = cfg.mlp == "swiglu"
        self.w1 = Linear(d, f, std=std, **kw)
        if self.swiglu:
            self.w3 = Linear(d, f, std=std, **kw)
        self.w2 = Linear(f, d, std=out_std, **kw)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x):
        low = amp.activation_dtype(x)  # the activation's kernels read and write it (as in attention)
        if self.swiglu:
            h = ops.swiglu(self.w1(x, out_dtype=low), self.w3(x, out_dtype=low))  # silu(w1 x) * w3 x
        else:
            h = ops.gelu(self.w1(x, out_dtype=low), approximate="tanh")
        return self.drop(self.w2(h))  # back in the weights' dtype: the residual stream's


def _norm(cfg):
    if cfg.norm == "rms":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype, device=cfg.device)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias, dtype=cfg.dtype, device=cfg.device)


class Block(Module):
    def __init__(self, cfg, layer):
        self.norm1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)
        self.layer, self.post_norm = layer, cfg.norm_position == "post"
        self.probe = None  # see the module docstring

    def forward(self, x, rope_tables=None, cache=None):
        if self.post_norm:
            a = self.attn(x, rope_tables, cache)
            x = self.norm1(x + a)
            m = self.mlp(x)
            x = self.norm2(x + m)
        else:
            a = self.attn(self.norm1(x), rope_tables, cache)
            x = x + a
            m = self.mlp(self.norm2(x))
            x = x + m
        if self.probe is not None:
            self.probe(self.layer, a, m, x)
        return x


class GPT(Module):
    """The language model. `logits, loss = model(idx, targets=None, cache=None)`; for training
    without the logits, `_, loss = model(idx, targets, return_logits=False)`."""

    def __init__(self, config):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"GPT needs a ModelConfig, not {type(config).__name__}")
        cfg = self.config = config
        kw = dict(dtype=cfg.dtype, device=cfg.device)
        emb_std = embedding_std(cfg)
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, std=emb_std, **kw)
        self.pos_emb = self.rope = self.pos_table = None
        if cfg.positions == "learned":
            self.pos_emb = Embedding(cfg.context_length, cfg.d_model, std=emb_std, **kw)
        elif cfg.positions == "sinusoidal":
            self.pos_table = SinusoidalPositions(cfg.context_length, cfg.d_model,
                                                 math.sqrt(2) * emb_std, **kw)
        elif cfg.positions == "rope":
            self.rope = RotaryEmbedding(cfg.head_dim, cfg.context_length, cfg.rope_theta,
                                        cfg.rope_style, **kw)
        self.drop = Dropout(cfg.dropout)
        self.blocks = [Block(cfg, i) for i in range(cfg.n_layers)]
        self.norm_f = _norm(cfg) if cfg.norm_position == "pre" else None
        # activation checkpointing (a training setting, not part of the model): when True,
        # training forwards keep only each block's input and recompute the block in backward
        self.checkpoint_blocks = False
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False, std=init_stds(cfg)[0],
                                  **kw)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name, **overrides):
        """A fresh model from PRESETS[name]; keyword overrides (and flavour="gpt2"|"llama")."""
        return cls(preset_config(name, **overrides))

    @classmethod
    def from_pretrained(cls, path, dtype="float32", device="cpu"):
        """Load a Hugging Face GPT-2 or Llama checkpoint: a directory with config.json and
        model.safetensors (or sharded model-0000N-of-0000M.safetensors), or a .safetensors
        file with config.json beside it."""
        from tinyllm.checkpoints_hf import load_hf

        return load_hf(cls, path, dtype=dtype, device=device)

    def new_cache(self, batch_size, max_len=None):
        """An empty KVCache for `batch_size` sequences of up to max_len (default: the context)."""
        cfg = self.config
        max_len = cfg.context_length if max_len is None else max_len
        if not 0 < max_len <= cfg.context_length:
            raise ValueError(f"new_cache: max_len must be in 1..{cfg.context_length}, got {max_len}")
        w = self.tok_emb.weight
        return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim, w.dtype, w.device)

    def to(self, device=None, dtype=None):
        super().to(device, dtype)
        if device is not None:
            self.config.device = backend.normalize_device(device)
        if dtype is not None:
            self.config.dtype = str(backend.as_dtype(dtype))
        return self

    # ---- forward ------------------------------------------------------------------------------
    def _check_idx(self, idx, name="idx"):
        data = idx.data if isinstance(idx, Tensor) else idx
        if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
            data = np.asarray(data)
        if data.dtype.kind not in "iu":
            raise TypeError(f"GPT: {name} must hold integer token ids, not {data.dtype}")
        if data.ndim != 2:
            raise ValueError(f"GPT: {name} must have shape (batch, time), got {data.shape}")
        device = self.tok_emb.weight.device
        return backend.to_device(data, device) if backend.device_of(data) != device else data

    def forward(self, idx, targets=None, cache=None, last_only=False, return_logits=True):
        """Logits (B, T, vocab) and the mean cross-entropy against `targets` (or None).

        idx: integer token ids (B, T), T <= context_length (with a cache: cache.length + T).
        targets: (B, T) next-token ids; entries equal to -100 are ignored.
        cache: a KVCache from `new_cache`: idx are the positions after those cached.
        last_only: compute the logits of the last position only, (B, 1, vocab) (sampling).
        return_logits: with targets, False returns (None, loss) and computes the loss with
            ops.linear_cross_entropy, which never holds the (B*T, vocab) logits or their
            gradient (for training); the same loss and gradients, one more product in backward.
        """
        idx = self._check_idx(idx)
        x = self.hidden(idx, cache, last_only)
        B, T = idx.shape
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        t = None
        if targets is not None:
            t = self._check_idx(targets, "targets")
            if t.shape != (B, T) or last_only:
                raise ValueError(f"GPT: targets of shape {t.shape} for idx of shape {(B, T)}")
            if not return_logits:
                return None, ops.linear_cross_entropy(x, head, t, ignore_index=-100)
        logits = ops.linear(x, head)
        loss = None if t is None else ops.cross_entropy(logits, t, ignore_index=-100)
        return logits, loss

    def hidden(self, idx, cache=None, last_only=False):
        """The final normalized hidden states (B, T, d_model), or (B, 1, d_model) with
        last_only: what the LM head reads (a reward model's scalar head reads them too)."""
        cfg = self.config
        idx = self._check_idx(idx)
        B, T = idx.shape
        start = 0
        if cache is not None:
            start = cache.length
            if B != cache.batch_size:
                raise ValueError(f"GPT: idx batch {B} but the cache holds {cache.batch_size} sequences")
            if start + T > cache.max_len:
                raise ValueError(
                    f"GPT: {T} new positions after {start} cached exceed the cache's {cache.max_len}"
                )
        if start + T > cfg.context_length:
            raise ValueError(
                f"GPT: sequence of length {start + T} is longer than the context ({cfg.context_length})"
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[start:start + T]
        elif self.pos_table is not None:
            x = x + Tensor(self.pos_table.rows(start, T, x.dtype))
        x = self.drop(x)
        tables = self.rope.tables(start, T, x.dtype) if self.rope is not None else None
        recompute = self.checkpoint_blocks and self.training and cache is None and is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(lambda x, block=block: block(x, tables), x, params=block.parameters())
            else:
                x = block(x, tables, cache)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        return x if self.norm_f is None else self.norm_f(x)

    # ---- accounting ----------------------------------------------------------------------------
    def num_params(self, non_embedding=True):
        """Number of parameters (tied matrices once). non_embedding=True leaves out the lookup
        tables that do no arithmetic: position embeddings, and the token embeddings unless they
        are tied to the LM head (then they are a matmul's weights, as in nanoGPT)."""
        n = self.num_parameters()
        if non_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.size
            if self.lm_head is not None:
                n -= self.tok_emb.weight.size
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 N (forward + backward matmuls, N = num_params()) plus
        12 L T d for attention scores and their weighted sums (T = context length)."""
        cfg = self.config
        T = cfg.context_length if seq_len is None else seq_len
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layers * T * cfg.d_model
