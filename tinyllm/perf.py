"""Process-wide tuning for training on the CPU, opted into by `tinyllm train` (and the
other training commands through its helpers), never by the engine itself: importing
`autograd` or `tinyllm` changes nothing about the process.

- `reuse_freed_memory`: glibc's malloc keeps freed arrays' pages for the next step.
- `set_blas_threads`, `blas_threads`, `blas_thread_count`: the BLAS library's thread count,
  read and set at run time (OpenBLAS or MKL, found among the loaded libraries).
- `run_slices`: work split over a pool of threads, the BLAS on 1 thread meanwhile.
"""

import contextlib
import ctypes
import functools
import os
import platform
from concurrent.futures import ThreadPoolExecutor, wait


def reuse_freed_memory():
    """Have glibc's malloc keep freed arrays' memory for reuse; True when it took the setting.

    A training step allocates and frees the same large arrays (activations, gradients,
    temporaries of 0.1-30 MB) every step. By default glibc serves each block above a
    threshold (128 KB, raised only as blocks are freed) with a fresh mmap and returns it to
    the OS on free, and trims the top of the heap; so each step the kernel maps and
    zero-fills the same memory again: ~26,000 page faults per step of the laptop preset, a
    fifth of its time on one core. Serving blocks up to 32 MB (glibc's upper limit) from the
    heap and keeping up to 1 GB of freed heap lets the next step reuse the same pages; peak
    memory stays the same. Process-wide; does nothing (returns False) without glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


@functools.cache
def _blas_libraries():
    """(set, get) thread-count functions of each BLAS library loaded in this process
    (OpenBLAS or MKL; get may be None), looked up in /proc/self/maps at the first call."""
    names = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
             ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
             ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
             ("openblas_set_num_threads", "openblas_get_num_threads"),
             ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"))
    paths = set()
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "blas" in line.lower() or "mkl" in line.lower()}
    except OSError:
        pass
    found = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in names:
            if hasattr(lib, set_name):
                found.append((getattr(lib, set_name), getattr(lib, get_name, None)))
                break
    return tuple(found)


def set_blas_threads(n):
    """Set the thread count of the BLAS NumPy uses (OpenBLAS or MKL) at run time; returns
    True when a library took it. Small models on a busy CPU train faster on 1 thread: idle
    BLAS threads spin, and on an oversubscribed machine they steal the cores doing the work."""
    for set_threads, _ in _blas_libraries():
        set_threads(int(n))
    return bool(_blas_libraries())


def blas_thread_count():
    """The thread count of the first BLAS library found (None when unknown)."""
    for _, get_threads in _blas_libraries():
        if get_threads is not None:
            return int(get_threads())
    return None


@contextlib.contextmanager
def blas_threads(n):
    """Run the block with the BLAS on n threads, then give each library its own count back."""
    libs = [(s, g) for s, g in _blas_libraries() if g is not None]
    saved = [int(g()) for _, g in libs]
    for set_threads, _ in libs:
        set_threads(int(n))
    try:
        yield
    finally:
        for (set_threads, _), k in zip(libs, saved):
            set_threads(k)


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def _thread_pool(n):
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="tinyllm-shard")


def run_slices(fn, slices):
    """[fn(*args) for args in slices], the first on this thread and the others at the same
    time on a pool's threads, with the BLAS on 1 thread meanwhile."""
    with blas_threads(1):
        others = [_thread_pool(len(slices) - 1).submit(fn, *a) for a in slices[1:]]
        try:
            first = fn(*slices[0])
        finally:
            wait(others)  # none outlives the BLAS setting
        return [first] + [f.result() for f in others]
