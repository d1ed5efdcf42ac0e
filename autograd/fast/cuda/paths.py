"""CUDA fast paths: each class is a reference op of autograd/ops/ (its base class) computed
by the kernels of kernels.py, registered for float32 CuPy inputs. Attention also runs its
bfloat16/float16 products this way under a low-precision mode (amp), on tensor cores.
Attention, RoPE, GELU and SwiGLU also take bfloat16/float16 inputs, which the model hands
them under a low-precision mode (amp.activation_dtype), and answer in that dtype.
tests/test_fast.py holds each to its reference (run on a GPU by scripts/gpu-check.sh).
"""

import numpy as np


from autograd import amp, backend, fast
from autograd.fast import FastPath
from autograd.fast.cuda import graph, kernels
from autograd.ops.activations import GeluTanh, SwiGLU
from autograd.ops.attention import Attention
from autograd.ops.dropout import Dropout
from autograd.ops.elementwise import Add
from autograd.ops.linalg import Linear, mm, mm_into
from autograd.ops.losses import CrossEntropy, LinearCrossEntropy, ce_reduce, ce_row_weights
from autograd.ops.norm import LayerNorm, RMSNorm
from autograd.ops.rope import Rotate
from autograd.tensor import is_grad_enabled


@fast.register("cuda", "float32")
class AddCUDA(FastPath, Add):
    """One vectorized pass for two arrays of one shape in C order (the residual stream's sums)."""

    @classmethod
    def supports(cls, *arrays):
        return (len(arrays) == 2 and arrays[0].shape == arrays[1].shape
                and all(a.flags.c_contiguous for a in arrays))

    def forward(self, a, b):
        return kernels.add(a, b)


def _low(*arrays):
    """The 16-bit dtype all the arrays share, or None."""
    dtypes = {a.dtype for a in arrays}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)).itemsize == 2 else None


@fast.register("cuda", "float32", "bfloat16", "float16")
class AttentionCUDA(FastPath, Attention):
    """P is never stored whole: the forward keeps y and the log-sum-exp of each row, the
    backward recomputes P from them (FlashAttention's scheme). Dropout's mask is a hash of
    (seed, element), recomputed too; the seed comes from the CPU generator (no device sync,
    and a checkpoint's generator state fixes it), through a slot in a captured step.

    q, k, v that arrive in bfloat16/float16 give y, dq, dk, dv in that dtype, float32 ones give
    float32. The flash kernels read q, k, v through their strides and write y in q's memory
    order and each gradient in its input's: for the model's (B, T, H, D)-ordered heads, the
    transposes and reshapes around attention are views both ways."""

    def forward(self, q, k, v):
        self.seed = graph.draw_seed() if self.dropout_p > 0 else 0
        self.out_dtype = _low(q, k, v) or np.dtype(np.float32)
        self.layouts = q.strides, k.strides, v.strides
        self.q, self.k, self.v = amp.low(q), amp.low(k), amp.low(v)
        self.y, self.lse = kernels.attention_forward(self.q, self.k, self.v, self.causal, self.scale,
                                                     self.dropout_p, self.seed, self.out_dtype,
                                                     out_layout=q.strides)
        return self.y

    def backward(self, g):
        return kernels.attention_backward(self.q, self.k, self.v, self.y, self.lse, g,
                                          self.causal, self.scale, self.dropout_p, self.seed,
                                          self.out_dtype, self.layouts)


@fast.register("cuda", "float32", "bfloat16", "float16")
class LinearCUDA(FastPath, Linear):
    """The reference's products, with two promises to the backward walk (autograd.tensor's
    Function.fresh_grads and takes_addends): its gradients are new arrays (a weight takes its
    gradient as .grad without a copy), and when its input's gradient so far is the walk's own
    array, dx = g W is accumulated into it by the product itself (cuBLAS's beta = 1) instead
    of a separate sum. The model's q, k, v (and w1, w3) share one input: the three products
    then sum its gradient."""

    fresh_grads = takes_addends = True

    def backward(self, g):
        a = self.addends[0] if self.addends else None
        if a is not None and not (self.owned[0] and a.dtype == self.dtypes[0]
                                  and a.flags.c_contiguous):
            self.addends[0] = None  # declined: the walk adds the two
        return super().backward(g)

    def grad_x(self, gl, dtype):
        a = self.addends[0] if self.addends else None
        if a is None:
            return super().grad_x(gl, dtype)
        mm_into(a.reshape(-1, a.shape[-1]), gl, self.w, False, False, accumulate=True)
        return a


def _recording(fn):
    """Whether fn's forward is being recorded for a backward (as Function.apply decides)."""
    return is_grad_enabled() and any(fn.needs_grad)


def _ce_rows(z, t):
    return kernels.cross_entropy_forward(z, t, -1)


@fast.register("cuda", "float32")
class CrossEntropyCUDA(FastPath, CrossEntropy):
    rows = staticmethod(_ce_rows)
    row_grads = staticmethod(kernels.cross_entropy_backward)


def _ce_row_grads_low(z, t, lse, w):
    """The logits' gradient in the dtype the LM head's products run in (amp.low's), written by
    the kernel itself: the reference writes float32, then amp.low casts it, two more passes
    over the largest array of the step (chunk rows x vocabulary)."""
    return kernels.cross_entropy_backward(z, t, lse, w, out_dtype=amp.low_dtype())


@fast.register("cuda", "float32")
class LinearCrossEntropyCUDA(FastPath, LinearCrossEntropy):
    """The reference's chunks, with the gradients made in the forward when they will be wanted
    (grad mode on, an input that requires grad) and the loss is one number ("mean", "sum").

    Then dL/dloss_i = g r_i, where g is the upstream gradient (one number) and r_i the row's
    weight for g = 1 (1/count or 1, 0 for ignored rows), so every gradient is g times the
    gradient for g = 1:
        dz_c = (softmax(z_c) - onehot(t_c)) r_c,   dx_c = dz_c W,   dW1 = sum_c dz_c^T x_c
    and backward returns g dx, g dW1. Each chunk's logits are made once (the reference makes
    them again in backward: a third of the head's FLOPs), and one kernel reads them for both
    the losses and dz. Forward keeps dx and dW1 (float32, the size of x and W) instead of the
    low-precision x and W; "none" and a forward without gradients run the reference's way."""

    rows = staticmethod(_ce_rows)
    row_grads = staticmethod(_ce_row_grads_low)
    fresh_grads = True

    def forward(self, x, w):
        self.early = self.reduction != "none" and _recording(self)
        if not self.early:
            return super().forward(x, w)
        cp = backend.cupy_module()
        self.shape = x.shape
        xl, wl = amp.low(x).reshape(-1, x.shape[-1]), amp.low(w)
        t = self.targets.reshape(-1)
        keep = t != self.ignore_index
        t = cp.where(keep, t, 0)
        n = xl.shape[0]
        count = keep.sum().astype(x.dtype) if self.reduction == "mean" else None
        r = ce_row_weights(cp.ones((), x.dtype), keep, count, self.reduction).astype(np.float32)
        losses = cp.empty(n, x.dtype)
        self.gx = cp.empty((n, x.shape[-1]), x.dtype) if self.needs_grad[0] else None
        self.gw = cp.zeros(w.shape, x.dtype) if self.needs_grad[1] else None
        for c in self._chunks(n):
            z = mm(xl[c], wl, False, True, x.dtype)  # this chunk's logits x_c W^T
            losses[c], _, dz = kernels.cross_entropy_forward(z, t[c], -1, r[c], amp.low_dtype())
            del z
            if self.gx is not None:
                mm_into(self.gx[c], dz, wl, False, False)
            if self.gw is not None:
                mm_into(self.gw, dz, xl[c], True, False, accumulate=True)
        losses *= keep
        return ce_reduce(self, losses, keep, x.shape[:-1], self.reduction)

    def backward(self, g):
        if not self.early:
            return super().backward(g)
        gx = None if self.gx is None else kernels.scale(self.gx, g).reshape(self.shape)
        return gx, (None if self.gw is None else kernels.scale(self.gw, g))


def _low_out(fn, x):
    """The dtype of a low-precision copy of fn's output for the products after it, or None:
    under a low-precision mode, when the graph is recorded (shared_low_copy only serves
    activations that have a creator)."""
    return amp.activation_dtype(x) if _recording(fn) else None


@fast.register("cuda", "float32")
class LayerNormCUDA(FastPath, LayerNorm):
    """One kernel each way; backward recomputes xhat from x and the saved mean and 1/std.
    Under a low-precision mode the forward also writes y in the low dtype (`out_low`): the
    copy the products after the norm read (ops.linalg.shared_low_copy), with no cast."""

    fresh_grads = takes_addends = True  # dx = the norm's gradient + x's pending one, one kernel

    def forward(self, x, w=None, b=None):
        self.x, self.w = x, w
        y, self.mean, self.rstd, self.out_low = kernels.norm_forward(
            x, w, b, self.eps, center=True, low=_low_out(self, x))
        return y

    def backward(self, g):
        gx, gw, gb = kernels.norm_backward(g, self.x, self.w, self.mean, self.rstd, True,
                                           self.w is not None, len(self.needs_grad) > 2,
                                           self.addends[0] if self.addends else None)
        return (gx, gw, gb)[: len(self.needs_grad)]


@fast.register("cuda", "float32")
class RMSNormCUDA(FastPath, RMSNorm):
    fresh_grads = takes_addends = True  # as LayerNormCUDA

    def forward(self, x, w=None):
        self.x, self.w = x, w
        y, self.mean, self.rstd, self.out_low = kernels.norm_forward(
            x, w, None, self.eps, center=False, low=_low_out(self, x))
        return y

    def backward(self, g):
        gx, gw, _ = kernels.norm_backward(g, self.x, self.w, self.mean, self.rstd, False,
                                          self.w is not None, False,
                                          self.addends[0] if self.addends else None)
        return (gx, gw)[: len(self.needs_grad)]


@fast.register("cuda", "float32", "bfloat16", "float16")
class SwiGLUCUDA(FastPath, SwiGLU):
    """One pass each way, in the inputs' dtype (float32 arithmetic)."""

    @classmethod
    def supports(cls, a, b):
        return a.shape == b.shape and a.dtype == b.dtype  # the kernels do not broadcast

    def forward(self, a, b):
        self.a, self.b = a, b
        return kernels.swiglu_forward(a, b)

    def backward(self, g):
        return kernels.swiglu_backward(g, self.a, self.b)


@fast.register("cuda", "float32", "bfloat16", "float16")
class GeluTanhCUDA(FastPath, GeluTanh):
    """One pass each way, in x's dtype; keeps only x (the backward recomputes tanh, cheaper
    than storing it). Under a low-precision mode a float32 x is kept in bfloat16/float16
    (amp.low), as the matrix products keep their inputs: half the memory of GPT-2's largest
    activation, for a derivative off by the input's rounding (as in PyTorch's autocast, where
    GELU runs on the low-precision output of the product before it)."""

    def forward(self, x):
        self.x = amp.low(x)
        return kernels.gelu_tanh_forward(x)

    def backward(self, g):
        return kernels.gelu_tanh_backward(g, self.x)


@fast.register("cuda", "float32", "bfloat16", "float16")
class RotateCUDA(FastPath, Rotate):
    """One pass each way in x's dtype (float32 tables and arithmetic), reading a strided input
    in place and writing the result, and the gradient, in the forward input's memory layout:
    for the model's q and k, the (B, T, H, D) order of the product they came from, which
    attention reads as it is, and the transpose and reshape behind RoPE pass the gradient on as
    views."""

    @classmethod
    def supports(cls, x, cos=None, sin=None):
        return cos is None or cos.dtype == np.float32 or cos.dtype == x.dtype

    def forward(self, x):
        self.layout = x.strides if x.ndim == 4 else None  # strides only: x itself is not kept
        return kernels.rope_rotate(x, self.cos, self.sin, +1, self.style == "interleaved",
                                   out_layout=self.layout)

    def backward(self, g):
        return kernels.rope_rotate(g, self.cos, self.sin, -1, self.style == "interleaved",
                                   out_layout=self.layout)


@fast.register("cuda", "float32")
class DropoutCUDA(FastPath, Dropout):
    """The reference's mask, hashed inside one kernel each way: forward keeps only the seed
    (not the mask), backward applies the same mask and scale to the gradient. The seed is
    drawn from the CPU generator as the reference's is (ops.dropout.keep_mask)."""

    def forward(self, x):
        self.seed = graph.draw_seed()
        return kernels.dropout_apply(x, self.p, self.seed)

    def backward(self, g):
        return kernels.dropout_apply(g, self.p, self.seed)


