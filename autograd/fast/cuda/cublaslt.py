"""cuBLASLt matrix products through ctypes: the same C = op(A) op(B) (+ C) as cublasGemmEx,
with the algorithm chosen per shape by cuBLASLt's heuristic, or by timing its best few
candidates once (`tune`, TINYLLM_GEMM=tune).

cuBLASLt is the cuBLAS interface that exposes the algorithm choice (and the epilogues that
fuse a bias or an activation into a product). On the products of a training step it picks
the same kernels as GemmEx and runs as fast as PyTorch's (benchmarks/gemm_gpu.py);
TINYLLM_GEMM=ex sends every product back to GemmEx.

A plan (the descriptors and the chosen algorithm) is built once per shape, layout and dtype
combination and kept; calls then cost one cublasLtMatmul. Everything here is host-side setup
plus that call on the current stream, so a captured step (graph.py) records it like a kernel.

Column-major throughout, as cuBLAS is: kernels.gemm swaps the operands of a row-major product.
"""

import ctypes
import os

from autograd import backend

# cublasLt enums (cublasLt.h)
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_LAYOUT_BATCH_COUNT, _LAYOUT_STRIDED_BATCH_OFFSET = 5, 6
_PREF_MAX_WORKSPACE_BYTES, _PREF_MIN_ALIGNMENT_A = 1, 5  # then B, C, D: 6, 7, 8
_CUDA_R_32F = 0
_CANDIDATES = 8  # heuristic results asked for (the first is used unless tuning)

WORKSPACE_BYTES = 32 << 20


class LtError(RuntimeError):
    pass


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t),
                ("state", ctypes.c_int), ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_lib = None
_handle = None
_workspace = None
_plans = {}


def available():
    """Whether cuBLASLt is loaded in this process (CuPy's cuBLAS links it) and not turned off
    (TINYLLM_GEMM=ex sends every product to GemmEx)."""
    if os.environ.get("TINYLLM_GEMM", "lt") == "ex":
        return False
    try:
        _load()
    except LtError:
        return False
    return True


def tuning():
    """TINYLLM_GEMM=tune: time the heuristic's candidates at each product's first call."""
    return os.environ.get("TINYLLM_GEMM", "lt") == "tune"


def _load():
    global _lib, _handle, _workspace
    if _lib is not None:
        return
    backend.cupy_module().cuda.get_cublas_handle()  # loads libcublas, and with it libcublasLt
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "/libcublasLt.so" in line})
    if not paths:
        raise LtError("libcublasLt is not loaded in this process")
    lib = ctypes.CDLL(paths[0])
    v, p, i, u64, i64, sz = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                             ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t)
    lib.cublasLtCreate.argtypes = [p]
    lib.cublasLtMatmulDescCreate.argtypes = [p, i, i]
    lib.cublasLtMatmulDescSetAttribute.argtypes = [v, i, v, sz]
    lib.cublasLtMatrixLayoutCreate.argtypes = [p, i, u64, u64, i64]
    lib.cublasLtMatrixLayoutSetAttribute.argtypes = [v, i, v, sz]
    lib.cublasLtMatmulPreferenceCreate.argtypes = [p]
    lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [v, i, v, sz]
    lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [v, v, v, v, v, v, v, i,
                                                   ctypes.POINTER(_HeuristicResult), ctypes.POINTER(i)]
    lib.cublasLtMatmul.argtypes = [v, v, v, v, v, v, v, v, v, v, v, v, v, v, sz, v]
    handle = ctypes.c_void_p()
    _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
    _lib, _handle = lib, handle
    _workspace = backend.cupy_module().cuda.runtime.malloc(WORKSPACE_BYTES)  # outside every pool


def _check(status, what):
    if status:
        raise LtError(f"cuBLASLt: {what} returned status {status}")


def _set(setter, obj, attr, value):
    buf = value if isinstance(value, ctypes._SimpleCData) else ctypes.c_int32(value)
    _check(setter(obj, attr, ctypes.byref(buf), ctypes.sizeof(buf)), f"attribute {attr}")


def _layout(dtype, rows, cols, ld, batch, stride):
    layout = ctypes.c_void_p()
    _check(_lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, ld), "layout")
    if batch > 1:
        _set(_lib.cublasLtMatrixLayoutSetAttribute, layout, _LAYOUT_BATCH_COUNT, ctypes.c_int32(batch))
        _set(_lib.cublasLtMatrixLayoutSetAttribute, layout, _LAYOUT_STRIDED_BATCH_OFFSET,
             ctypes.c_int64(stride))
    return layout


class Plan:
    """One product's descriptors and algorithm: C (m x n) = op(A) op(B) + beta C. `key`: (trans
    A, trans B, m, n, k, A's cudaDataType, lda, A's batch stride, the same for B and for C,
    batch, cublasComputeType)."""

    def __init__(self, key):
        (ta, tb, m, n, k, ta_type, lda, sa, tb_type, ldb, sb, c_type, ldc, sc, batch, compute,
         aligns) = key
        self.desc = ctypes.c_void_p()
        _check(_lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), compute, _CUDA_R_32F), "desc")
        _set(_lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_TRANSA, ta)
        _set(_lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_TRANSB, tb)
        self.a = _layout(ta_type, k if ta else m, m if ta else k, lda, batch, sa)
        self.b = _layout(tb_type, n if tb else k, k if tb else n, ldb, batch, sb)
        self.c = _layout(c_type, m, n, ldc, batch, sc)
        pref = ctypes.c_void_p()
        _check(_lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        _set(_lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES,
             ctypes.c_uint64(WORKSPACE_BYTES))
        for j, align in enumerate(aligns + aligns[-1:]):  # D is C
            _set(_lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MIN_ALIGNMENT_A + j,
                 ctypes.c_uint32(align))
        results = (_HeuristicResult * _CANDIDATES)()
        found = ctypes.c_int(0)
        _check(_lib.cublasLtMatmulAlgoGetHeuristic(_handle, self.desc, self.a, self.b, self.c, self.c,
                                                   pref, _CANDIDATES, results, ctypes.byref(found)),
               f"no algorithm for the product {key}")
        if found.value == 0:
            raise LtError(f"cuBLASLt: no algorithm for the product {key}")
        self.candidates = [results[j] for j in range(found.value)]
        self.algo = self.candidates[0]
        self.tuned = len(self.candidates) == 1

    def run(self, a_ptr, b_ptr, c_ptr, beta, algo=None):
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(beta)
        stream = backend.cupy_module().cuda.get_current_stream().ptr
        algo = self.algo if algo is None else algo
        _check(_lib.cublasLtMatmul(_handle, self.desc, ctypes.byref(alpha), a_ptr, self.a, b_ptr, self.b,
                                   ctypes.byref(beta), c_ptr, self.c, c_ptr, self.c,
                                   ctypes.byref(algo.algo), _workspace, WORKSPACE_BYTES, stream),
               "cublasLtMatmul")

    def tune(self, a_ptr, b_ptr, c_ptr, repeats=3):
        """Time each candidate on these operands (writing c, with beta 0) and keep the fastest.
        Not while capturing (it reads the timings on the host)."""
        cp = backend.cupy_module()
        best = None
        for cand in self.candidates:
            self.run(a_ptr, b_ptr, c_ptr, 0.0, cand)  # warm
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(repeats):
                self.run(a_ptr, b_ptr, c_ptr, 0.0, cand)
            end.record()
            end.synchronize()
            ms = cp.cuda.get_elapsed_time(start, end)
            if best is None or ms < best[0]:
                best = (ms, cand)
        self.algo, self.tuned = best[1], True


def alignment(ptr):
    """The largest power of two up to 256 that divides an address (the algorithms the
    heuristic may return depend on it: an offset view is less aligned than a fresh array)."""
    return min(256, ptr & -ptr) if ptr else 256


def plan(key):
    """The plan for a product `key` (see Plan), made on first use; None when cuBLASLt has no
    algorithm for it (the caller then uses GemmEx)."""
    _load()
    if key not in _plans:
        try:
            _plans[key] = Plan(key)
        except LtError:
            _plans[key] = None
    return _plans[key]
