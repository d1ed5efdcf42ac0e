"""Building blocks: Module, Parameter and the common layers.

A Module finds its parameters and submodules by looking at its own attributes: a Parameter,
a Module, or a list/tuple of Modules (named by their index, e.g. `blocks.0.attn.wq.weight`).
Any other Tensor attribute is a buffer: it moves with `to(device)` but is not saved in the
state dict (e.g. RoPE's cos/sin tables, which are recomputed). No metaclass, no registration.
"""

import numpy as np

from autograd import backend, ops
from autograd.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that is a learnable weight of a Module (requires grad)."""

    def __init__(self, data, dtype=None, device=None):
        super().__init__(data, requires_grad=True, dtype=dtype, device=device)


class Module:
    training = True

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- the module tree ------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_parameters(self, prefix=""):
        for path, module in self.named_modules(prefix):
            for name, value in vars(module).items():
                if isinstance(value, Parameter):
                    yield (f"{path}.{name}" if path else name), value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return int(sum(p.size for p in self.parameters()))

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self):
        """Parameter name -> array (the live arrays, not copies)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters, converting to each parameter's dtype and device.

        Raises KeyError listing missing and unexpected names (when strict) and ValueError for
        shape mismatches, before changing anything.
        """
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            raise KeyError(
                f"state dict does not match the model: missing {missing or 'none'}, "
                f"unexpected {unexpected or 'none'}"
            )
        for name, value in state.items():
            if name in params and tuple(np.shape(value)) != params[name].shape:
                raise ValueError(
                    f"state dict entry {name!r} has shape {tuple(np.shape(value))}, "
                    f"the model's parameter has shape {params[name].shape}"
                )
        for name, value in state.items():
            if name in params:
                p = params[name]
                value = value.data if isinstance(value, Tensor) else value
                p.data = backend.to_device(value, p.device).astype(p.dtype, copy=True)
        return missing, unexpected

    # ---- mode, device, gradients ---------------------------------------------------------------
    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def to(self, device=None, dtype=None):
        """Move (and/or cast) every parameter and buffer in place; returns self."""
        dtype = backend.as_dtype(dtype)
        for m in self.modules():
            for value in vars(m).values():
                if isinstance(value, Tensor):
                    if device is not None:
                        value.data = backend.to_device(value.data, device)
                    if dtype is not None and isinstance(value, Parameter):
                        value.data = value.data.astype(dtype)
                    value.grad = None
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None


def _uniform(shape, bound, dtype, device):
    x = backend.rng("cpu").uniform(-bound, bound, size=shape).astype(np.float32)
    return Parameter(x, dtype=dtype, device=device)


def _normal(shape, std, dtype, device):
    """Normal(0, std) samples from the seeded CPU generator, then cast and moved."""
    x = backend.rng("cpu").standard_normal(shape, dtype=np.float32) * np.float32(std)
    return Parameter(x, dtype=dtype, device=device)


def _zeros(shape, dtype, device):
    return Parameter(np.zeros(shape, np.float32), dtype=dtype, device=device)


class Linear(Module):
    """y = x W^T + b, W of shape (out_features, in_features).

    Init: PyTorch's default (uniform in +-1/sqrt(in_features)), or with `std` given,
    W ~ normal(0, std) and b = 0 (GPT-2's scheme).
    """

    def __init__(self, in_features, out_features, bias=True, dtype=None, device=None, std=None):
        shape = (out_features, in_features)
        if std is None:
            bound = 1 / np.sqrt(in_features)
            self.weight = _uniform(shape, bound, dtype, device)
            self.bias = _uniform((out_features,), bound, dtype, device) if bias else None
        else:
            self.weight = _normal(shape, std, dtype, device)
            self.bias = _zeros((out_features,), dtype, device) if bias else None

    def forward(self, x, out_dtype=None):
        return ops.linear(x, self.weight, self.bias, out_dtype)


class LoRALinear(Module):
    """A frozen Linear plus a trainable low-rank update (LoRA, Hu et al. 2021):

        y = x W^T + b + (alpha / rank) (x A^T) B^T,   A (rank, in), B (out, rank)

    `weight` and `bias` are the base layer's own Parameters (so their state-dict names stay
    e.g. `blocks.0.attn.wq.weight`), frozen here. A starts uniform in +-1/sqrt(in) (PEFT's
    Kaiming-uniform bound) and B at zero, so the wrapped layer starts equal to the base.
    """

    def __init__(self, base, rank, alpha, dtype=None, device=None):
        if not isinstance(base, Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, not {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"LoRALinear: rank must be a positive integer, not {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
                or not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoRALinear: alpha must be a finite number > 0, not {alpha!r}")
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad = False
        if self.bias is not None:
            self.bias.requires_grad = False
        out_features, in_features = self.weight.shape
        dtype = self.weight.dtype if dtype is None else dtype
        device = self.weight.device if device is None else device
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / int(rank)
        self.lora_A = _uniform((self.rank, in_features), 1 / np.sqrt(in_features), dtype, device)
        self.lora_B = _zeros((out_features, self.rank), dtype, device)

    def forward(self, x, out_dtype=None):
        y = ops.lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scale, self.bias)
        return y if out_dtype is None or y.dtype == out_dtype else ops.cast(y, out_dtype)

    def merged(self):
        """A plain Linear computing the same function: weight W + scale B A, the same bias."""
        w = self.weight.data + self.scale * (self.lora_B.data @ self.lora_A.data)
        layer = Linear.__new__(Linear)  # no init: its random draws would be thrown away
        layer.weight = Parameter(w.astype(self.weight.dtype, copy=False))
        layer.bias = self.bias
        return layer


class Embedding(Module):
    """A table of `num_embeddings` rows; init normal(0, std), std=1 as in PyTorch."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, device=None, std=1.0):
        self.weight = _normal((num_embeddings, embedding_dim), std, dtype, device)

    def forward(self, idx):
        return ops.embedding(self.weight, idx)


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-5, bias=True, dtype=None, device=None):
        self.eps = eps
        self.weight = Parameter(np.ones(dim, np.float32), dtype=dtype, device=device)
        self.bias = Parameter(np.zeros(dim, np.float32), dtype=dtype, device=device) if bias else None

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(Module):
    def __init__(self, dim, eps=1e-6, dtype=None, device=None):
        self.eps = eps
        self.weight = Parameter(np.ones(dim, np.float32), dtype=dtype, device=device)

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class Dropout(Module):
    def __init__(self, p=0.0):
        self.p = p

    def forward(self, x):
        return ops.dropout(x, self.p, self.training)
