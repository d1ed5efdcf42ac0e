"""Array backends: NumPy on the CPU, CuPy on a CUDA GPU.

Every op finds its array module (`xp`) from the arrays it is given, so the CPU path never
imports CuPy. A device is a string: "cpu" or "cuda" ("cuda:N" picks a GPU by number).
The process default comes from `set_default_device()` or the environment variable
TINYLLM_DEVICE=cpu|cuda.
"""

import os

import numpy as np

_default_device = None
_cupy = None


def cupy_module():
    """Import CuPy on first use; a clear error when it is missing or finds no GPU."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as e:
            raise RuntimeError(
                "device 'cuda' needs CuPy: pip install 'tinyllm[cuda]' (or a cupy-cudaXXx wheel "
                "matching your CUDA)"
            ) from e
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            raise RuntimeError(f"device 'cuda' requested but CuPy finds no usable GPU: {e}") from e
        _cupy = cupy
    return _cupy


def cuda_available():
    """True when CuPy imports and sees at least one GPU."""
    try:
        return cupy_module().cuda.runtime.getDeviceCount() > 0
    except RuntimeError:
        return False


def normalize_device(device):
    if device is None:
        return default_device()
    device = str(device)
    if device == "cpu" or device == "cuda":
        return device
    if device.startswith("cuda:") and device[5:].isdigit():
        return device
    raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def default_device():
    global _default_device
    if _default_device is None:
        _default_device = normalize_device(os.environ.get("TINYLLM_DEVICE", "cpu"))
    return _default_device


def set_default_device(device):
    """Set the device new tensors go to when none is named."""
    global _default_device
    _default_device = normalize_device(device)


def is_cupy_array(a):
    return type(a).__module__.startswith("cupy")


def get_array_module(a):
    """numpy or cupy, whichever `a` belongs to."""
    return _cupy if is_cupy_array(a) else np


def xp_for_device(device):
    return np if normalize_device(device) == "cpu" else cupy_module()


def device_of(a):
    if is_cupy_array(a):
        return "cuda" if a.device.id == 0 else f"cuda:{a.device.id}"
    return "cpu"


def to_device(a, device):
    """Copy an array to `device` (no copy when it is already there)."""
    device = normalize_device(device)
    if device == "cpu":
        return a.get() if is_cupy_array(a) else np.asarray(a)
    cp = cupy_module()
    index = int(device[5:]) if ":" in device else 0
    with cp.cuda.Device(index):
        return cp.asarray(a)


# ---- dtypes -----------------------------------------------------------------------------

def bfloat16():
    """The bfloat16 dtype (from ml_dtypes, which CuPy 14 also uses)."""
    try:
        import ml_dtypes
    except ImportError as e:
        raise RuntimeError("bfloat16 needs the ml_dtypes package: pip install ml_dtypes") from e
    return np.dtype(ml_dtypes.bfloat16)


def as_dtype(dtype):
    """Turn 'float32', 'bfloat16', np.float64, ... into a numpy dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        return bfloat16()
    return np.dtype(dtype)


def is_float_dtype(dtype):
    return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


# ---- helpers shared by ops ----------------------------------------------------------------

def sum_to(g, shape):
    """Undo broadcasting: sum `g` over the axes that broadcasting added or stretched.

    If y = broadcast(x) then dL/dx = sum of dL/dy over every copy of x, i.e. over the leading
    axes broadcasting prepended and over the axes where x had size 1.
    """
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead < 0:
        raise ValueError(f"gradient of shape {g.shape} cannot be reduced to shape {shape}")
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    if lead:
        g = g.reshape(g.shape[lead:])
    if g.shape != shape:
        raise ValueError(f"gradient of shape {g.shape} cannot be reduced to shape {shape}")
    return g


def erf(x):
    """The error function for NumPy or CuPy arrays."""
    if is_cupy_array(x):
        from cupyx.scipy.special import erf as cupy_erf

        return cupy_erf(x)
    try:
        from scipy.special import erf as scipy_erf

        return scipy_erf(x)
    except ImportError:
        import math

        return np.asarray(np.frompyfunc(math.erf, 1, 1)(x), dtype=x.dtype)  # 0-d gives a float


# ---- random numbers ---------------------------------------------------------------------

_rng = {}


def manual_seed(seed):
    """Seed every random stream the engine uses (parameter init, dropout) on all devices."""
    _rng.clear()
    _rng["seed"] = int(seed)


def rng(device="cpu"):
    """The generator for `device`: numpy.random.Generator or cupy.random.Generator."""
    device = normalize_device(device)
    if device not in _rng:
        seed = _rng.get("seed")
        if device == "cpu":
            _rng[device] = np.random.default_rng(seed)
        else:
            cp = cupy_module()
            _rng[device] = cp.random.default_rng(seed)
    return _rng[device]


def get_rng_state():
    """A picklable snapshot of the CPU generator (for exact resume)."""
    return {"seed": _rng.get("seed"), "cpu": rng("cpu").bit_generator.state}


def set_rng_state(state):
    _rng.clear()
    if state.get("seed") is not None:
        _rng["seed"] = state["seed"]
    rng("cpu").bit_generator.state = state["cpu"]
