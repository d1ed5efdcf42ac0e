"""Fast paths: tuned implementations of reference ops, and the one place that picks them.

Every op in `autograd/ops/` is a reference: a Function whose forward and backward read like
the math, on NumPy or CuPy arrays alike. A fast path is a subclass of that reference which
computes the same thing with fewer passes over memory: CPU-tuned code (scratch arrays updated
in place, attention in query blocks, sorted embedding sums) in `fast/cpu.py`, CUDA kernels in
`fast/cuda/`. Each declares what it runs on:

    @fast.register("cpu", "float32")
    class LayerNormCPU(LayerNorm):      # implements the reference LayerNorm
        ...

and the ops ask `fast.pick(LayerNorm, x, w)` for the class to use: the first fast path
registered for the arrays' device and dtype (and whose `supports` accepts them), else the
reference itself. TINYLLM_FUSED=0 in the environment makes `pick` return the reference
everywhere. tests/test_fast.py holds every registered path to its reference, forward and
backward, in the dtypes it runs in.
"""

import os
import threading

import numpy as np

from autograd import backend

_registry = {}  # reference Function class -> fast subclasses, in registration order


def enabled():
    """False when TINYLLM_FUSED=0: every op runs its reference."""
    return os.environ.get("TINYLLM_FUSED", "1") != "0"


def register(device, *dtypes):
    """Class decorator: this subclass of a reference op runs on `device` ("cpu" or "cuda")
    for inputs of the given dtypes (names, e.g. "float32")."""
    def add(cls):
        cls.device, cls.dtypes = device, frozenset(dtypes)
        _registry.setdefault(cls.reference(), []).append(cls)
        return cls
    return add


def registered():
    """Every registered fast path, as {reference class: [fast classes]}."""
    _load()
    return {ref: list(paths) for ref, paths in _registry.items()}


def pick(reference, *arrays):
    """The class to run `reference` with on these input arrays (None entries are skipped)."""
    if not enabled():
        return reference
    _load()
    arrays = [a for a in arrays if a is not None]
    device = "cuda" if backend.is_cupy_array(arrays[0]) else "cpu"
    for cls in _registry.get(reference, ()):
        if (cls.device == device and all(np.dtype(a.dtype).name in cls.dtypes for a in arrays)
                and cls.supports(*arrays)):
            return cls
    return reference


def cuda_float32(*arrays):
    """True when the fast paths are on and every array is a float32 CuPy array (the multi-
    tensor optimizer kernels' condition)."""
    return enabled() and all(backend.is_cupy_array(a) and a.dtype == np.float32 for a in arrays)


def astype(a, dtype):
    """a.astype(dtype) in C order. A float32 CuPy array cast to bfloat16/float16 (amp.low, for
    every operand of a low-precision product) goes through one CUDA pass (cuda/cast.cu),
    strided views included, unless the fast paths are off."""
    if (enabled() and backend.is_cupy_array(a) and a.dtype == np.float32
            and np.dtype(dtype).name in ("bfloat16", "float16")):
        from autograd.fast.cuda import kernels

        return kernels.cast(a, dtype)
    return a.astype(dtype)


def add(a, b):
    """a + b. Two float32 CuPy arrays of one shape in C order (the engine's sums of gradient
    pieces, the residual stream's sums) go through one vectorized CUDA pass (cuda/
    elementwise.cu), unless the fast paths are off; anything else through the backend's +."""
    if (enabled() and backend.is_cupy_array(a) and backend.is_cupy_array(b) and a.shape == b.shape
            and a.dtype == np.float32 and b.dtype == np.float32
            and a.flags.c_contiguous and b.flags.c_contiguous):
        from autograd.fast.cuda import kernels

        return kernels.add(a, b)
    return a + b


def capturing():
    """Whether a CUDA graph is being captured (fast/cuda/graph.py): the ops then skip their
    checks that read device data on the host, which a captured step cannot do."""
    from autograd.fast.cuda import graph

    return graph.capturing()


class FastPath:
    """Mixin of every fast path: names its reference and may refuse some inputs."""

    @classmethod
    def reference(cls):
        """The reference op this class implements: its nearest base that is not a fast path."""
        return next(c for c in cls.__mro__[1:] if not issubclass(c, FastPath))

    @classmethod
    def supports(cls, *arrays):
        return True


_loaded = False


_load_lock = threading.RLock()


def _load():
    """Import the modules that register fast paths (once; they import the ops they tune).
    Marked done only when both are imported, under a lock: a thread that found the flag set
    while another was still importing would pick references for the ops not yet registered
    (slices of a batch on threads, tinyllm.train's data_threads, then differ in the last bits
    on the first step of a process)."""
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if not _loaded:
            from autograd.fast import cpu  # noqa: F401
            from autograd.fast.cuda import paths  # noqa: F401
            _loaded = True
