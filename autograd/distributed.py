"""Data parallelism: one replica of the parameters per device, each computing the gradients of
its own share of every batch; the shares' gradients are summed over the replicas before the step.

    group = NcclGroup.from_env()                 # one process per GPU (RANK, WORLD_SIZE, ...)
    dp = DataParallel(params, AdamW(params), group, zero1=False)
    opt = dp.optimizer                           # the AdamW, or its ZeRO-1 sharded form
    for each step:
        backward of this rank's rows, each loss weighted by its share of the whole batch
        tensors = dp.reduce_grads()              # .grad now the sum over the ranks
        norm = dp.grad_norm(tensors); clip; opt.step(); opt.zero_grad()

Weighting each rank's loss by its share and summing (rather than averaging equal shares) keeps
the step the same as one process's on the whole batch when the shares differ in size.

The communication layer is `Group`: all_reduce, all_gather, reduce_scatter, broadcast, barrier.
`NcclGroup` runs it on NCCL through CuPy (one process per GPU; the same from one host to
several: the ranks meet at MASTER_ADDR:MASTER_PORT). `LocalGroup` runs N ranks as threads of
one process on NumPy arrays, summing in rank order, so the whole data-parallel path (bucketing,
sharding, resume) is tested on the CPU. A collective that does not finish within `timeout`
seconds (a peer died or hangs) ends in a PeerError (LocalGroup) or exits the process with a
one-line message (NcclGroup, whose stuck GPU kernel cannot be interrupted).
"""

import math
import os
import platform
import socket
import struct
import sys
import threading
import time

import numpy as np

from autograd import backend
from autograd.optim import AdamW, grad_norm
from autograd.tensor import Tensor

DEFAULT_TIMEOUT = float(os.environ.get("TINYLLM_DIST_TIMEOUT", 600))  # seconds per collective
JOIN_TIMEOUT = 300.0  # seconds, at least, for every rank to start and join (imports, NCCL setup)
EXIT_PEER = 3  # the exit code of a process whose collective timed out or failed
OPS = ("sum", "avg")


class PeerError(RuntimeError):
    """Another rank failed, or a collective did not finish in time."""


def _check_op(op):
    if op not in OPS:
        raise ValueError(f"unknown reduction {op!r}: expected one of {', '.join(OPS)}")


class Group:
    """A set of `world_size` ranks that run the same collectives in the same order.

    Arrays are NumPy or CuPy, contiguous; every rank passes the same shape and dtype."""

    rank = 0
    world_size = 1

    def all_reduce(self, a, op="sum"):
        """Replace `a` on every rank by the elementwise sum (op="avg": mean) over the ranks."""
        raise NotImplementedError

    def all_gather(self, a, out=None):
        """Every rank's `a`, flattened and laid end to end in rank order: a 1-D array of
        world_size * a.size elements, written into `out` when given (then `a` may be this
        rank's own slice of `out`)."""
        raise NotImplementedError

    def reduce_scatter(self, a, op="sum"):
        """The sum (op="avg": mean) over the ranks of the flattened `a`, cut into world_size
        equal slices: this rank's slice, a new 1-D array (a.size must divide evenly)."""
        raise NotImplementedError

    def broadcast(self, a, root=0):
        """Replace `a` on every rank by root's `a`."""
        raise NotImplementedError

    def barrier(self):
        """Return once every rank got here."""
        raise NotImplementedError

    def close(self):
        pass


def _chunk_size(a, world_size):
    if a.size % world_size:
        raise ValueError(f"reduce_scatter: {a.size} elements do not split into {world_size} "
                         "equal slices")
    return a.size // world_size


# ---- in-process ranks (tests on the CPU) ------------------------------------------------------

class _Hub:
    """What the threads of a LocalGroup share: one slot per rank and a barrier."""

    def __init__(self, world_size, timeout):
        self.slots = [None] * world_size
        self.gate = threading.Barrier(world_size)
        self.timeout = timeout
        self.failed_rank, self.failure = None, None

    def wait(self, rank):
        try:
            self.gate.wait(self.timeout)
        except threading.BrokenBarrierError:
            why = self.failure or (f"a collective did not finish in {self.timeout:g} s "
                                   "(another rank stopped or hangs)")
            raise PeerError(f"rank {rank}: stopped: {why}") from None

    def exchange(self, rank, a, combine):
        """Each rank deposits `a`; once all have, each computes combine(all deposits in rank
        order) (every rank the same, in the same order: reproducible sums); the deposits
        stay untouched until every rank has read them."""
        self.slots[rank] = a
        self.wait(rank)
        out = combine(self.slots)
        self.wait(rank)
        return out

    def abort(self, rank, message):
        if self.failure is None:
            self.failed_rank, self.failure = rank, message
        self.gate.abort()


def _sum(arrays):
    total = arrays[0].copy()
    for a in arrays[1:]:
        total += a
    return total


class LocalGroup(Group):
    """One rank of N that run as threads of this process (for tests: NumPy arrays, the CPU).
    Make them with `LocalGroup.create(n)`, or run a function on each with `run_local`."""

    def __init__(self, hub, rank):
        self.hub, self.rank, self.world_size = hub, rank, len(hub.slots)

    @classmethod
    def create(cls, world_size, timeout=60.0):
        hub = _Hub(world_size, timeout)
        return [cls(hub, r) for r in range(world_size)]

    def all_reduce(self, a, op="sum"):
        _check_op(op)
        total = self.hub.exchange(self.rank, a, _sum)
        if op == "avg":
            total = total / self.world_size
        a[...] = total
        return a

    def all_gather(self, a, out=None):
        gathered = self.hub.exchange(self.rank, a, lambda s: np.concatenate([x.ravel() for x in s]))
        if out is None:
            return gathered
        out.reshape(-1)[...] = gathered
        return out

    def reduce_scatter(self, a, op="sum"):
        _check_op(op)
        n = _chunk_size(a, self.world_size)
        r = self.rank
        part = self.hub.exchange(self.rank, a, lambda s: _sum([x.ravel()[r * n:(r + 1) * n]
                                                               for x in s]))
        return part / self.world_size if op == "avg" else part

    def broadcast(self, a, root=0):
        a[...] = self.hub.exchange(self.rank, a, lambda s: s[root].copy())
        return a

    def barrier(self):
        self.hub.exchange(self.rank, None, lambda s: None)


def run_local(fn, world_size, timeout=60.0):
    """fn(group) on `world_size` threads, each with its LocalGroup rank; their results in rank
    order. When a rank raises, the others' next collective fails at once, and this raises a
    PeerError naming the first rank that failed (chained to its exception)."""
    groups = LocalGroup.create(world_size, timeout)
    hub = groups[0].hub
    results, errors = [None] * world_size, [None] * world_size

    def body(r):
        try:
            results[r] = fn(groups[r])
        except BaseException as e:  # noqa: B902 (every failure must release the others)
            errors[r] = e
            hub.abort(r, f"rank {r} failed: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=body, args=(r,), name=f"rank-{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if hub.failure is not None:
        raise PeerError(hub.failure) from errors[hub.failed_rank]
    return results


# ---- NCCL (one process per GPU) -----------------------------------------------------------------

def nccl_module():
    """cupy.cuda.nccl, or a RuntimeError saying how to get NCCL."""
    backend.cupy_module()
    if "cupy.cuda.nccl" not in sys.modules:
        _preload_pip_nccl()
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise RuntimeError(f"NCCL through CuPy is unavailable: {e}") from None
    if not getattr(nccl, "available", False):
        raise RuntimeError("CuPy finds no NCCL library: pip install nvidia-nccl-cu12 (or "
                           "python -m cupyx.tools.install_library --library nccl)")
    return nccl


def _preload_pip_nccl():
    """Load libnccl.so.2 process-wide from the nvidia-nccl wheel (which PyTorch also installs)
    when the system's loader finds none: CuPy's NCCL binding links against that name."""
    import ctypes
    import glob

    try:
        ctypes.CDLL("libnccl.so.2", mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    try:
        import nvidia.nccl
    except ImportError:
        return
    for folder in list(getattr(nvidia.nccl, "__path__", [])):
        for path in sorted(glob.glob(os.path.join(folder, "lib", "libnccl.so*"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


_CHAR_SIGNED = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def rendezvous(rank, world_size, addr, port, make_id, timeout=DEFAULT_TIMEOUT):
    """The NCCL unique id (128 bytes) every rank needs to join: rank 0 makes it with
    `make_id()` and serves it on `port` until every other rank, connecting to addr:port (and
    retrying while rank 0 starts), has it. Each rank says its rank and world size; rank 0
    refuses a mismatch. Raises PeerError when the ranks do not all meet within `timeout`."""
    deadline = time.monotonic() + timeout
    if rank == 0:
        uid = make_id()  # bytes (CuPy 14) or a tuple of C chars (earlier CuPy)
        payload = uid if isinstance(uid, bytes) else bytes(x & 0xFF for x in uid)
        try:
            server = socket.create_server(("", port))
        except OSError as e:
            raise PeerError(f"rank 0: cannot listen on port {port} for the other ranks: "
                            f"{e.strerror or e} (set MASTER_PORT to a free port)") from None
        with server:
            joined = set()
            while len(joined) < world_size - 1:
                left = deadline - time.monotonic()
                missing = sorted(set(range(1, world_size)) - joined)
                if left <= 0:
                    raise PeerError(f"rank 0: ranks {missing} did not reach {addr}:{port} within "
                                    f"{timeout:g} s")
                server.settimeout(left)
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                with conn:
                    conn.settimeout(max(left, 1.0))
                    r, w = struct.unpack("!ii", _recv_exact(conn, 8))
                    if w != world_size or not 0 < r < world_size or r in joined:
                        raise PeerError(f"rank 0: a process says it is rank {r} of {w}; this run "
                                        f"has {world_size} ranks (WORLD_SIZE) and has met ranks "
                                        f"{sorted(joined | {0})}")
                    conn.sendall(payload)
                    joined.add(r)
        return payload
    while True:
        left = deadline - time.monotonic()
        try:
            conn = socket.create_connection((addr, port), timeout=max(min(left, 10.0), 0.1))
        except OSError:
            if left <= 0:
                raise PeerError(f"rank {rank}: cannot reach rank 0 at {addr}:{port} within "
                                f"{timeout:g} s (MASTER_ADDR, MASTER_PORT)") from None
            time.sleep(0.2)
            continue
        with conn:
            conn.settimeout(max(left, 1.0))
            conn.sendall(struct.pack("!ii", rank, world_size))
            try:
                data = _recv_exact(conn, 128)
            except (OSError, ConnectionError):
                raise PeerError(f"rank {rank}: rank 0 at {addr}:{port} refused this rank (of "
                                f"{world_size}; see rank 0's error)") from None
        return data


def _recv_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


class NcclGroup(Group):
    """One rank per process and GPU (the current CuPy device), through NCCL.

    Collectives run on the current CUDA stream, in order with the kernels around them, and
    return without waiting. A watchdog thread checks each one finishes within `timeout`
    seconds (joining: at least JOIN_TIMEOUT) and asks NCCL for asynchronous errors; on either
    it prints one line and exits the process (code EXIT_PEER): a GPU kernel waiting on a dead
    peer cannot be interrupted."""

    def __init__(self, rank, world_size, addr="127.0.0.1", port=29500, timeout=DEFAULT_TIMEOUT):
        self.cp = backend.cupy_module()
        self.nccl = nccl_module()
        self.rank, self.world_size, self.timeout = int(rank), int(world_size), float(timeout)
        self.device = self.cp.cuda.Device()
        self._pending = []  # (what, seconds allowed, deadline, CUDA event or None: a host call)
        self._lock = threading.Lock()
        self._closed = False
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="nccl-watchdog")
        self._watchdog.start()
        join = max(self.timeout, JOIN_TIMEOUT)
        uid = rendezvous(self.rank, self.world_size, addr, port, self.nccl.get_unique_id, join)
        entry = self._begin("joining the NCCL group", limit=join)
        try:
            self.comm = self.nccl.NcclCommunicator(self.world_size, uid, self.rank)
        except TypeError:  # CuPy before 14 takes the id as a tuple of C chars
            chars = tuple(b - 256 if _CHAR_SIGNED and b > 127 else b for b in uid)
            self.comm = self.nccl.NcclCommunicator(self.world_size, chars, self.rank)
        self._end(entry)

    @classmethod
    def from_env(cls, timeout=DEFAULT_TIMEOUT):
        """The group of this process from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT."""
        env = os.environ
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), env.get("MASTER_ADDR", "127.0.0.1"),
                   int(env.get("MASTER_PORT", 29500)), timeout)

    # ---- the watchdog ----------------------------------------------------------------------------
    def _begin(self, what, event=None, limit=None):
        limit = limit or self.timeout
        entry = (what, limit, time.monotonic() + limit, event)
        with self._lock:
            self._pending.append(entry)
        return entry

    def _end(self, entry):
        with self._lock:
            self._pending.remove(entry)

    def _launched(self, what):
        """Record an event after the collective just enqueued, for the watchdog to check."""
        event = self.cp.cuda.Event(block=False, disable_timing=True)
        event.record(self.cp.cuda.get_current_stream())
        self._begin(what, event)

    def _watch(self):
        self.device.use()  # this thread's CUDA calls on this rank's GPU
        while not self._closed:
            time.sleep(0.5)
            if self._closed:
                break
            now = time.monotonic()
            with self._lock:
                self._pending = [e for e in self._pending if e[3] is None or not e[3].done]
                late = [e for e in self._pending if now > e[2]]
            error = None
            if late:
                error = (f"{late[0][0]} did not finish in {late[0][1]:g} s: another rank "
                         "stopped or hangs")
            elif getattr(self, "comm", None) is not None:
                try:
                    self.comm.check_async_error()
                except getattr(self.nccl, "NcclError", ()) as e:  # a broken peer link, ...
                    error = f"NCCL error: {e}"
            if error and not self._closed:
                print(f"rank {self.rank}: {error}; exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_PEER)

    # ---- collectives -------------------------------------------------------------------------------
    def _dtype(self, a):
        name = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "float16": "NCCL_FLOAT16",
                "bfloat16": "NCCL_BFLOAT16", "int32": "NCCL_INT32", "int64": "NCCL_INT64",
                "uint8": "NCCL_UINT8", "int8": "NCCL_INT8"}.get(a.dtype.name)
        if name is None or not hasattr(self.nccl, name):
            raise TypeError(f"NCCL collectives do not take {a.dtype} arrays here")
        return getattr(self.nccl, name)

    def _on_device(self, a):
        """(device array, whether `a` was a host array copied over); `a` must be contiguous."""
        if not backend.is_cupy_array(a):
            return self.cp.asarray(np.ascontiguousarray(a)), True
        if not a.flags.c_contiguous:
            raise ValueError(f"NCCL collectives need contiguous arrays (shape {a.shape})")
        return a, False

    def _stream(self):
        return self.cp.cuda.get_current_stream().ptr

    def all_reduce(self, a, op="sum"):
        _check_op(op)
        buf, copied = self._on_device(a)
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf),
                            self.nccl.NCCL_SUM, self._stream())
        self._launched("all_reduce")
        if op == "avg":
            buf /= self.world_size
        if copied:
            a[...] = buf.get().reshape(a.shape)
        return a

    def all_gather(self, a, out=None):
        buf, copied = self._on_device(a)
        if out is None:
            out = self.cp.empty(self.world_size * buf.size, buf.dtype)
        elif out.size != self.world_size * buf.size or not out.flags.c_contiguous:
            raise ValueError(f"all_gather: out holds {out.size} elements, needs "
                             f"{self.world_size} x {buf.size}, contiguous")
        self.comm.allGather(buf.data.ptr, out.data.ptr, buf.size, self._dtype(buf), self._stream())
        self._launched("all_gather")
        return out.get() if copied else out

    def reduce_scatter(self, a, op="sum"):
        _check_op(op)
        buf, copied = self._on_device(a)
        n = _chunk_size(buf, self.world_size)
        part = self.cp.empty(n, buf.dtype)
        self.comm.reduceScatter(buf.data.ptr, part.data.ptr, n, self._dtype(buf),
                                self.nccl.NCCL_SUM, self._stream())
        self._launched("reduce_scatter")
        if op == "avg":
            part /= self.world_size
        return part.get() if copied else part

    def broadcast(self, a, root=0):
        buf, copied = self._on_device(a)
        self.comm.bcast(buf.data.ptr, buf.size, self._dtype(buf), root, self._stream())
        self._launched("broadcast")
        if copied:
            a[...] = buf.get().reshape(a.shape)
        return a

    def barrier(self):
        self.all_reduce(self.cp.zeros(1, np.float32))
        entry = self._begin("barrier")
        self.cp.cuda.get_current_stream().synchronize()
        self._end(entry)

    def close(self):
        """Wait for the work in flight, then free the communicator."""
        if self._closed:
            return
        self.cp.cuda.get_current_stream().synchronize()
        self._stop_watchdog()
        self.comm.destroy()

    def abort(self):
        """Free the communicator at once, without waiting for the collectives in flight (this
        rank is failing: waiting could hang on peers that wait for it)."""
        if self._closed:
            return
        self._stop_watchdog()
        try:
            self.comm.abort()
        except Exception:  # noqa: BLE001 (an NCCL without ncclCommAbort: the exit frees it)
            pass

    def _stop_watchdog(self):
        self._closed = True
        if self._watchdog is not threading.current_thread():
            self._watchdog.join()


# ---- data parallelism over a group --------------------------------------------------------------

def _flat_grads(params, size=None):
    """Every parameter's .grad (zeros where it has none) laid end to end in one new 1-D array,
    zero-padded to `size` elements."""
    xp = params[0].xp
    parts = [p.grad.reshape(-1) if p.grad is not None else xp.zeros(p.size, p.dtype)
             for p in params]
    n = sum(p.size for p in params)
    if size is not None and size > n:
        parts.append(xp.zeros(size - n, params[0].dtype))
    return xp.concatenate(parts)


def _buckets(params, bucket_bytes):
    """Consecutive parameters of one dtype, cut into groups of about `bucket_bytes`."""
    buckets, current, size = [], [], 0
    for p in params:
        if current and (size >= bucket_bytes or p.dtype != current[0].dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += p.size * p.dtype.itemsize
    return buckets + ([current] if current else [])


class DataParallel:
    """The exchange of gradients of data-parallel training, for any model.

    Every rank backpropagates its own share of the batch, each loss weighted by the share's
    part of the whole (so the weighted losses add up to the batch's loss); `reduce_grads` then
    sums the gradients over the ranks. They go in buckets of about `bucket_bytes`: each
    bucket's gradients are copied into one contiguous array, summed in one collective, and the
    parameters' .grad become views of it (one call per bucket instead of one per parameter, and
    no copy back).

    zero1=True: ZeRO stage 1. The AdamW becomes a ShardedAdamW (see there): reduce_grads
    reduce-scatters, so each rank gets the summed gradients of its own slice of the parameters
    only, and the step updates that slice and all-gathers the rest.
    """

    def __init__(self, params, optimizer, group, zero1=False, bucket_bytes=25 << 20):
        self.params = list(params)
        self.group, self.zero1 = group, zero1
        if zero1 and not isinstance(optimizer, AdamW):
            raise TypeError(f"zero1 shards an AdamW's state, not a {type(optimizer).__name__}'s")
        self.optimizer = ShardedAdamW(optimizer, group) if zero1 else optimizer
        self.buckets = [] if zero1 else _buckets(self.params, bucket_bytes)

    def broadcast_params(self, root=0):
        """Give every rank root's weights (replicas must start equal)."""
        for p in self.params:
            self.group.broadcast(p.data, root)

    def reduce_grads(self):
        """Sum the gradients over the ranks; returns the tensors whose .grad now hold the sums:
        the parameters, or under ZeRO-1 this rank's slices of them."""
        if self.zero1:
            return self.optimizer.reduce_scatter_grads()
        for bucket in self.buckets:
            flat = self.group.all_reduce(_flat_grads(bucket))
            offset = 0
            for p in bucket:
                p.grad = flat[offset:offset + p.size].reshape(p.shape)
                offset += p.size
        return self.params

    def grad_norm(self, tensors):
        """The global L2 norm of the summed gradients (from the slices' norms under ZeRO-1)."""
        norm = grad_norm(tensors)
        if not self.zero1:
            return norm
        return math.sqrt(self.sum([norm * norm])[0])

    def sum(self, values):
        """The numbers `values` summed over the ranks (a float64 NumPy array)."""
        return self.group.all_reduce(np.array(values, dtype=np.float64))


class ShardedAdamW:
    """ZeRO stage 1 over an AdamW: each rank keeps and updates 1/world_size of the state.

    The parameters of each optimizer group are laid out in one flat buffer (their .data become
    views of it), zero-padded to world_size equal slices. Rank r holds the AdamW moments of
    slice r only. A step: the group's flattened gradients are reduce-scattered (rank r receives
    the sum of slice r), rank r updates slice r, and all_gather writes every rank's updated
    slice into every rank's buffer, i.e. into the parameters. The moments take 2/world_size of
    the memory they take unsharded; the gradients are summed with the same traffic as one
    all-reduce (which is a reduce-scatter and an all-gather).

    The update is AdamW's own: an inner AdamW steps one Tensor per group, a view of this rank's
    slice, with the group's hyperparameters (its lr as the schedule sets it). `state_dict` puts
    the slices back together in AdamW's per-parameter layout (a collective: every rank calls
    it), so a checkpoint is the same with or without sharding, and resumes at any world size.
    """

    def __init__(self, adamw, group):
        self.group = group
        self.param_groups = adamw.param_groups  # the schedule sets lr here; copied at each step
        W, r = group.world_size, group.rank
        self.layouts = []  # per group: (params, flat buffer, this rank's slice as a Tensor)
        inner_groups = []
        for g in self.param_groups:
            params = g["params"]
            if len({p.dtype for p in params}) > 1:
                raise TypeError("zero1: the parameters of an optimizer group differ in dtype")
            n = sum(p.size for p in params)
            S = -(-n // W)  # slice length (the last rank's slice ends in padding)
            flat = params[0].xp.zeros(S * W, params[0].dtype)
            offset = 0
            for p in params:
                flat[offset:offset + p.size] = p.data.reshape(-1)
                p.data = flat[offset:offset + p.size].reshape(p.shape)
                offset += p.size
            shard = Tensor._wrap(flat[r * S:(r + 1) * S], requires_grad=True)
            self.layouts.append((params, flat, shard))
            inner_groups.append({k: v for k, v in g.items() if k != "params"} | {"params": [shard]})
        self.inner = AdamW(inner_groups)
        self.inner.step_count = adamw.step_count
        self._take_state(adamw)

    def _take_state(self, adamw):
        """This rank's slices of the moments of `adamw` (when it has any: a resumed run)."""
        r = self.group.rank
        for params, flat, shard in self.layouts:
            states = [adamw.state.get(id(p)) for p in params]
            if not any(states):
                continue
            S = shard.size
            slot = self.inner.state.setdefault(id(shard), {})
            for name in ("exp_avg", "exp_avg_sq"):
                full = shard.xp.zeros_like(flat)
                offset = 0
                for p, st in zip(params, states):
                    if st:
                        full[offset:offset + p.size] = st[name].reshape(-1)
                    offset += p.size
                slot[name] = full[r * S:(r + 1) * S].copy()

    @property
    def step_count(self):
        return self.inner.step_count

    def parameters(self):
        return [p for g in self.param_groups for p in g["params"]]

    def reduce_scatter_grads(self):
        """Each group's summed gradients, this rank's slice, into its slice Tensor's .grad; the
        parameters' full-size gradients are dropped. Returns the slice Tensors."""
        W = self.group.world_size
        for params, flat, shard in self.layouts:
            g = _flat_grads(params, shard.size * W)
            for p in params:
                p.grad = None
            shard.grad = self.group.reduce_scatter(g)
        return [shard for _, _, shard in self.layouts]

    def step(self):
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in outer.items() if k != "params"})
        self.inner.step()
        for _, flat, shard in self.layouts:
            self.group.all_gather(shard.data, out=flat)

    def zero_grad(self):
        for params, _, shard in self.layouts:
            shard.grad = None
            for p in params:
                p.grad = None

    def state_dict(self):
        """AdamW.state_dict of the whole (unsharded) optimizer. A collective."""
        state, index = {}, 0
        for params, _, shard in self.layouts:
            slot = self.inner.state.get(id(shard))
            if slot:
                full = {name: backend.to_device(self.group.all_gather(slot[name]), "cpu")
                        for name in ("exp_avg", "exp_avg_sq")}
            offset = 0
            for i, p in enumerate(params, index):
                if slot:
                    state[i] = {name: a[offset:offset + p.size].reshape(p.shape).copy()
                                for name, a in full.items()}
                offset += p.size
            index += len(params)
        groups = [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
                  for g in self.param_groups]
        return {"type": "AdamW", "step": self.step_count, "groups": groups, "state": state}
