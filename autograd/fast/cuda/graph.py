"""CUDA graphs: a training step captured once and replayed, for static shapes.

A step of a small model is a few hundred kernels of a few microseconds each, and Python takes
longer to launch each one than the GPU takes to run it. Captured once into a CUDA graph
(CuPy's stream capture), the whole step replays as one launch.

Replaying runs the recorded kernels on the recorded addresses with the recorded arguments, so
a captured step may not
- read a value on the host (`loss.item()`, a norm, an input check): its results stay on the
  device, as arrays the caller reads after the replay; inputs are checked before they are
  copied into the step's input arrays;
- pass a Python number that changes from step to step (the learning rate, Adam's bias
  corrections, dropout seeds): such numbers live in *slots*, device memory the kernels read
  through a pointer. The capturing code asks for one with `slot(fill, dtype)`; before each
  replay `fill()` is called (in the order the slots were made) and the values are copied up;
- keep memory it allocated: the arrays made while capturing come from a pool of their own that
  nothing else allocates from, so the addresses the graph writes stay the graph's.

Code that must act differently while capturing asks `capturing()`. What the captured code
would have done on the host once per step (count Adam's steps, draw dropout seeds from the CPU
generator) moves into the fills, which run once per replay: so a replayed run draws the same
seeds in the same order as an uncaptured one, and its checkpoints hold the same state.
"""

import ctypes

import numpy as np

from autograd import backend

_active = None  # the StepGraph being captured (one capture at a time, in one thread)


def capturing():
    """Whether a step is being captured (kernels are recorded, not run; no host reads)."""
    return _active is not None


def active():
    return _active


class CaptureError(RuntimeError):
    """The step cannot be captured; the message says what stood in the way."""


def _where(e):
    """' (at FILE:LINE in FUNCTION)': the innermost frame of the project's code that raised e."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if ("/autograd/" in f.filename or "/tinyllm/" in f.filename)
              and not f.filename.endswith("graph.py")]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {'/'.join(f.filename.split('/')[-2:])}:{f.lineno} in {f.name})"


class StepGraph:
    """`fn(*inputs)` captured as one CUDA graph. `inputs`: device arrays fn reads (the step's
    static inputs: copy each step's data into them with `set_inputs`); fn returns a device
    array or a tuple of them (kept: each replay rewrites them). `launch()` runs the step.

    Capturing runs fn's Python once without running its kernels; call `capture()` after at
    least one ordinary call of fn, so that lazily made state (optimizer moments, compiled
    kernels, cached tables) exists outside the graph.
    """

    F32_SLOTS, U64_SLOTS = 1024, 4096

    def __init__(self, fn, inputs):
        cp = backend.cupy_module()
        self.fn, self.inputs = fn, list(inputs)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()  # the graph's own: its addresses stay its own
        # upload()'s arrays: apart from self.pool, whose blocks are freed and handed out again
        # within the capture, so an upload there could share its address with a temporary the
        # replay overwrites before the upload is read
        self.kept_pool = cp.cuda.MemoryPool()
        self.fills = []  # (fill, kind, index) in the order the slots were asked for
        self.kept = []  # buffers the graph reads at each replay: never freed while it lives
        self._pending = []  # (device array, host values) of upload(), filled after capture
        self._host = {}
        self._dev = {}
        for kind, n, dtype in (("f32", self.F32_SLOTS, np.float32), ("u64", self.U64_SLOTS, np.uint64)):
            mem = cp.cuda.alloc_pinned_memory(n * 8)
            self._host[kind] = np.frombuffer(mem, dtype, n)
            self.kept.append(mem)
            self._dev[kind] = cp.zeros(n, dtype)
        self._used = {"f32": 0, "u64": 0}
        self.graph = None
        self.outputs = None

    # ---- slots ----------------------------------------------------------------------------
    def slot(self, fill, dtype, n=1):
        """n consecutive device values of dtype (float32 or uint64) that `fill()` (a number,
        or n numbers) sets before every replay; returns their address."""
        kind = {np.dtype(np.float32): "f32", np.dtype(np.uint64): "u64"}[np.dtype(dtype)]
        i = self._used[kind]
        if i + n > len(self._host[kind]):
            raise CaptureError(f"more than {len(self._host[kind])} {np.dtype(dtype).name} "
                               "slots in one step")
        self._used[kind] = i + n
        self.fills.append((fill, kind, i, n))
        return self._dev[kind].data.ptr + i * self._dev[kind].itemsize

    def on_replay(self, fn):
        """fn() runs before every replay (a host-side effect of the captured step)."""
        self.fills.append((fn, None, 0, 0))

    def upload(self, host):
        """A device copy of the NumPy array `host` for the captured kernels to read. No copy
        can be recorded while capturing (CuPy refuses host-to-device copies then), so the
        array is allocated now, kept with the graph (its address is never handed out again)
        and filled once when the capture ends: every replay reads the same values."""
        cp = backend.cupy_module()
        with cp.cuda.using_allocator(self.kept_pool.malloc):
            dev = cp.empty(host.shape, host.dtype)
        self.kept.append(dev)
        self._pending.append((dev, np.array(host)))
        return dev

    def _fill(self):
        for fill, kind, i, n in self.fills:
            v = fill()
            if kind is not None:
                self._host[kind][i:i + n] = v
        for kind, used in self._used.items():
            if used:
                self._dev[kind].data.copy_from_host_async(
                    ctypes.c_void_p(self._host[kind].ctypes.data), used * self._dev[kind].itemsize)

    # ---- capture and replay ---------------------------------------------------------------
    def capture(self):
        """Record fn; raises CaptureError (and leaves nothing captured) when it cannot be."""
        global _active
        cp = backend.cupy_module()
        runtime = cp.cuda.runtime
        if _active is not None:
            raise CaptureError("another step is being captured")
        cp.cuda.Device().synchronize()  # the uncaptured work before it is done
        self.fills, self._used, self._pending = [], {"f32": 0, "u64": 0}, []
        mode = getattr(runtime, "streamCaptureModeRelaxed", 2)
        with self.stream, cp.cuda.using_allocator(self.pool.malloc):
            _active = self
            self.stream.begin_capture(mode)
            try:
                outputs = self.fn(*self.inputs)
            except BaseException as e:
                _active = None
                try:
                    self.stream.end_capture()
                except Exception:
                    pass
                self.stream.synchronize()
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise CaptureError(f"{type(e).__name__}: {e}{_where(e)}") from e
            finally:
                _active = None
            try:
                self.graph = self.stream.end_capture()
            except Exception as e:
                raise CaptureError(f"{type(e).__name__}: {e}") from e
            for dev, host in self._pending:  # the uploads, now that copies may run
                dev.set(host, self.stream)
            self._pending = []
            self.stream.synchronize()
        self.outputs = outputs

    def set_inputs(self, *arrays):
        """Copy this step's data (NumPy or CuPy arrays of the inputs' shapes) into the inputs."""
        cp = backend.cupy_module()
        if len(arrays) != len(self.inputs):
            raise ValueError(f"{len(arrays)} inputs for a step captured with {len(self.inputs)}")
        with self.stream:
            for dst, src in zip(self.inputs, arrays):
                if src.shape != dst.shape:
                    raise ValueError(f"an input of shape {src.shape} for a step captured with "
                                     f"{dst.shape}: the shapes of a captured step are fixed")
                if isinstance(src, np.ndarray):
                    dst.set(np.ascontiguousarray(src, dtype=dst.dtype), self.stream)
                else:
                    cp.copyto(dst, src, casting="same_kind")

    def launch(self):
        """Run the captured step once (after the fills); returns its outputs, ready to read."""
        self.stream.synchronize()  # the last replay has read the slots' host buffers
        with self.stream:
            self._fill()
            self.graph.launch()
        self.stream.synchronize()
        return self.outputs


# ---- dropout seeds ------------------------------------------------------------------------------

class SeedSlot:
    """A dropout seed that lives in a captured step's slot: each replay draws it anew."""

    def __init__(self, ptr):
        self.ptr = ptr


def _draw():
    return int(backend.rng("cpu").integers(1 << 63))


def draw_seed():
    """A seed for a dropout mask from the CPU generator (so its state, saved in checkpoints,
    fixes every mask). While capturing: a SeedSlot, drawn before each replay in the order of
    the draws, which is the order an uncaptured step draws them in."""
    if _active is None:
        return _draw()
    return SeedSlot(_active.slot(_draw, np.uint64))


def seed_args(seed):
    """(seed, seed_ptr) for the kernels: a number by value, or a slot's address."""
    if isinstance(seed, SeedSlot):
        return np.uint64(0), np.uint64(seed.ptr)
    return np.uint64(seed), np.uint64(0)
