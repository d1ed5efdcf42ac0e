"""Mixed precision: the dtype matrix products run in, and loss scaling for float16.

Precision modes (`set_precision`, or `with autocast(mode):`):
- "float32": plain float32 everywhere.
- "tf32": float32 storage; on CUDA, float32 matrix products use TensorFloat-32 tensor cores
  (10-bit mantissa inputs, float32 accumulation): the engine's cuBLAS products read the mode.
- "bfloat16" / "float16": the matrix-product ops (linear, matmul, the two products inside
  attention) cast their float32 operands to the low dtype, multiply with float32 accumulation,
  and hand back float32. Weights stay float32 ("master weights"), and so do optimizer state,
  softmax, norms and the loss. float16 has a narrow range: pair it with `GradScaler`.
  On the GPU a caller may ask a product for its result in the low dtype instead, where only
  kernels that read that dtype come next (`activation_dtype`: the model's q, k, v and MLP
  activations), as PyTorch's autocast hands results on.

The mode is per thread: an autocast block in one thread leaves the others' products alone.
`count_casts()` / `cast_counts()` count the operands' values that overflow or underflow when
cast to the low dtype.
"""

import threading

import numpy as np

from autograd import backend, fast

MODES = ("float32", "tf32", "bfloat16", "float16")


class _Precision(threading.local):
    def __init__(self):  # runs once in each thread that touches it
        self.mode = "float32"  # each thread starts in float32
        self.low = None  # the low-precision dtype of the matrix products, or None
        self.saved = []  # the modes autocast blocks will restore, innermost last


_state = _Precision()


def set_precision(mode):
    """Choose the precision mode of every following op in this thread (see the module
    docstring). A mode that cannot be set raises and leaves the current one in force."""
    if mode not in MODES:
        raise ValueError(f"precision must be one of {', '.join(MODES)}, not {mode!r}")
    low = {"bfloat16": backend.bfloat16, "float16": lambda: np.dtype(np.float16)}.get(mode, lambda: None)()
    _state.mode, _state.low = mode, low  # only once everything above has succeeded


def precision():
    return _state.mode


class autocast:
    """`with autocast("bfloat16"): ...` sets the precision mode inside the block (in this
    thread). Re-entrant: the mode to restore is kept per thread, not on the object."""

    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        prev = _state.mode
        set_precision(self.mode)  # raises before anything is pushed if the mode is bad
        _state.saved.append(prev)

    def __exit__(self, *exc):
        set_precision(_state.saved.pop())


def low_dtype():
    """The matrix-product dtype of the current mode (bfloat16/float16), or None."""
    return _state.low


def activation_dtype(x):
    """The dtype a product should hand its result on in when only low-precision kernels read
    it (the model's q, k, v, and GELU's and SwiGLU's inputs), or None for the usual one.

    Under a low-precision mode, on the GPU with the fast paths on: the low dtype. Those kernels
    read and write it (computing in float32), so a float32 result would be written only to be
    cast again; PyTorch's autocast hands products on in the low dtype the same way. Elsewhere
    (the CPU, float32, TINYLLM_FUSED=0) None: the results stay in the working dtype.
    """
    low_ = _state.low
    data = getattr(x, "data", x)
    if low_ is None or not fast.enabled() or not backend.is_cupy_array(data):
        return None
    return low_


def low(a):
    """`a` in the matrix-product dtype: cast when a low precision is on and `a` is float32."""
    low_ = _state.low
    if low_ is not None and a.dtype == np.float32:
        b = fast.astype(a, low_)
        if _counting:
            _count_cast(a, b)
        return b
    return a


# ---- what the casts lose, counted on request (a training monitor reads it) -------------------
# Every operand of a low-precision product passes through low(): counting there sees them all.

_counting = False
_counts = {"values": 0, "overflow": 0, "underflow": 0}
_counts_lock = threading.Lock()  # products run on several threads at once on the CPU


def count_casts(on=True):
    """Count, from now on (or no longer), the values cast to the low dtype: `overflow`,
    finite float32 that became inf/nan; `underflow`, nonzero float32 that became 0. Costs
    one pass over each operand while on; nothing while off."""
    global _counting
    _counting = bool(on)


def cast_counts(reset=False):
    """{"values", "overflow", "underflow"}: the counts since the last reset."""
    with _counts_lock:
        out = dict(_counts)
        if reset:
            _counts.update(values=0, overflow=0, underflow=0)
    return out


def _count_cast(a, b):
    xp = backend.get_array_module(a)
    b = b.astype(np.float32)  # bfloat16 has no ufuncs on every backend; float32 holds it exactly
    overflow = int(xp.count_nonzero(xp.isfinite(a) & ~xp.isfinite(b)))
    underflow = int(xp.count_nonzero((a != 0) & (b == 0)))
    with _counts_lock:
        _counts["values"] += a.size
        _counts["overflow"] += overflow
        _counts["underflow"] += underflow


def high(a, dtype):
    """A matrix product's result back in the working dtype."""
    return a if a.dtype == dtype else a.astype(dtype)


class GradScaler:
    """Dynamic loss scaling for float16 training.

    Multiply the loss by `scale` before backward so small gradients survive float16; before
    the optimizer step, divide the gradients by it. A step whose gradients hold inf or nan is
    skipped and the scale halved; after `growth_interval` good steps in a row it doubles.

        loss = scaler.scale(loss); loss.backward()
        if scaler.unscale_(opt.parameters()):   # False: overflow, skip this step
            opt.step()
        scaler.update()
    """

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, min_scale=1.0):
        self.scale_value = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_steps = 0
        self.found_inf = False

    def scale(self, loss):
        return loss * self.scale_value

    def unscale_(self, params):
        """Divide every gradient by the scale; return True when all are finite."""
        inv = 1.0 / self.scale_value
        finite = True
        for p in params:
            if p.grad is None:
                continue
            p.grad *= inv
            if finite and not bool(p.xp.isfinite(p.grad).all()):
                finite = False
        self.found_inf = not finite
        return finite

    def update(self):
        if self.found_inf:
            self.scale_value = max(self.scale_value * self.backoff_factor, self.min_scale)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale_value *= self.growth_factor

    def state_dict(self):
        return {"scale": self.scale_value, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale_value, self.good_steps = float(state["scale"]), int(state["good_steps"])
