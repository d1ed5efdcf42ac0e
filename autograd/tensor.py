"""Tensor and Function: the whole reverse-mode engine.

A Tensor wraps one array (NumPy or CuPy). Applying a Function to tensors runs its `forward`
on their arrays and, when any input requires grad, records the Function as the new tensor's
creator. `Tensor.backward()` then walks the recorded graph once, in reverse topological order,
calling each Function's `backward` with the gradient of its output and routing the returned
input gradients to the inputs. The walk is iterative: a heap of Functions keyed on their
generation (one more than the deepest input), so every consumer of a tensor is processed
before its creator and deep graphs never touch Python's recursion limit. `grad(output,
inputs)` runs the same walk but returns the inputs' gradients instead of adding to `.grad`.

Threads: the grad mode (`no_grad`) is per thread, and a walk touches only its own graph
(and, for `backward`, the leaves' `.grad`), so threads may build and differentiate separate
graphs over shared parameters at once, each taking its gradients with `grad`.

Versions: each tensor counts the in-place changes made to its array through the engine
(`t[idx] = v`, `add_`, `mul_`, `copy_`, `zero_`, an optimizer's step, `bump_version`). A
Function notes the version of every input whose array it keeps for backward; backward
raises if one changed since, instead of differentiating with the changed values. An
optimizer's update after backward is legal: backward has freed the graph by then.
"""

import heapq
import itertools
import threading
import weakref

import numpy as np

from autograd import backend, fast


class _GradMode(threading.local):
    def __init__(self):  # runs once in each thread that touches it
        self.enabled = True  # each thread starts with recording on
        self.saved = []  # the modes to restore, innermost last


_grad_mode = _GradMode()


def is_grad_enabled():
    return _grad_mode.enabled


class _set_grad_mode:
    """Context manager and decorator setting the grad mode of this thread inside.

    The mode to restore is kept on a per-thread stack, not on the object: one object may be
    entered twice (nested, or from two threads) and each exit restores what its enter found.
    """

    mode = True

    def __enter__(self):
        _grad_mode.saved.append(_grad_mode.enabled)
        _grad_mode.enabled = self.mode

    def __exit__(self, *exc):
        _grad_mode.enabled = _grad_mode.saved.pop()

    def __call__(self, fn):
        def wrapper(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        wrapper.__name__ = getattr(fn, "__name__", "wrapper")
        wrapper.__doc__ = getattr(fn, "__doc__", None)
        return wrapper


class no_grad(_set_grad_mode):
    """Context manager and decorator: no graph is recorded inside (in this thread)."""

    mode = False


class enable_grad(_set_grad_mode):
    """Context manager: the graph is recorded inside even within no_grad (in this thread)."""

    mode = True


class Function:
    """One differentiable operation.

    Subclasses implement `forward(*arrays) -> array` and `backward(grad) -> tuple` with one
    gradient (or None) per input, each of the input's shape or broadcastable to it: the engine
    sums broadcast axes away in one place (`backend.sum_to`). `forward` saves on `self` only
    what `backward` needs; the engine drops it after backward has run. `self.needs_grad[i]`
    tells whether input i wants a gradient, so backward can skip work.
    """

    needs_grad = ()
    # Two promises a Function may make, so that the walk skips passes over gradient arrays:
    # fresh_grads: every gradient backward returns is a new array that nothing else holds (a
    #   leaf takes it as its .grad without a copy; a sum may be accumulated into it).
    # takes_addends: backward can add an input's pending gradient (the sum so far of what the
    #   input's other consumers handed back) into its own. The walk sets `addends`, one array
    #   or None per input, and `owned`, whether the Function may write into that array, before
    #   backward; the gradient returned for input i includes addends[i] unless backward set
    #   addends[i] to None (declined: the walk adds the two as usual).
    fresh_grads = False
    takes_addends = False
    addends = owned = None

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def apply(self, *inputs):
        tensors = [x if isinstance(x, Tensor) else None for x in inputs]
        ref = next(t for t in tensors if t is not None)
        device = ref.device
        for t in tensors:
            if t is not None and t.device != device:
                raise RuntimeError(
                    f"{type(self).__name__}: tensors on different devices: {device} and {t.device}"
                    " (move one with .to(device))"
                )
        arrays = [
            t.data if t is not None else _scalar_array(x, ref) for t, x in zip(tensors, inputs)
        ]
        needs = tuple(t is not None and t.requires_grad for t in tensors)
        record = _grad_mode.enabled and any(needs)
        self.needs_grad = needs
        out = Tensor._wrap(self.forward(*arrays), requires_grad=record)
        if record:
            self.saved_versions = _saved_versions(self, tensors)
            self.inputs = [_edge(t) for t in tensors]
            self.generation = max(t._generation for t in tensors if t is not None)
            out._ctx = self
            out._generation = self.generation + 1
        return out


def _is_array(a):
    return isinstance(a, np.ndarray) or backend.is_cupy_array(a)


def _same_memory(a, b):
    """True when a and b are one array or views of one base (identity checks only: cheap)."""
    base_a = a if a.base is None else a.base
    base_b = b if b.base is None else b.base
    return base_a is base_b


def _saved_versions(fn, tensors):
    """(version cell, version now) of each input tensor whose array (or a view of it) `fn`
    kept on itself for backward: what the walk checks before calling fn.backward."""
    kept = []
    for v in vars(fn).values():
        if _is_array(v):
            kept.append(v)
        elif isinstance(v, (list, tuple)):
            kept.extend(a for a in v if _is_array(a))
    return [(t._version, t._version[0]) for t in tensors
            if t is not None and any(_same_memory(a, t.data) for a in kept)]


def _check_versions(fn):
    for cell, version in getattr(fn, "saved_versions", ()):
        if cell[0] != version:
            raise RuntimeError(
                f"{type(fn).__name__}: an input it saved for backward was modified in place "
                f"after the forward (version {cell[0]}, saved at version {version}); make the "
                "change out of place, or after backward"
            )


class _Edge:
    """What backward needs of a non-leaf input: its creator, shape and dtype.

    The graph holds these rather than the tensors, so an intermediate array lives on only
    if some Function saved it for its backward. A weak reference finds the tensor again
    if it is still around and asked to keep its gradient (retain_grad).
    """

    __slots__ = ("_ctx", "shape", "dtype", "tensor")

    def __init__(self, t):
        self._ctx, self.shape, self.dtype, self.tensor = t._ctx, t.shape, t.dtype, weakref.ref(t)


def _edge(t):
    if t is None or not t.requires_grad:
        return None
    return t if t._ctx is None else _Edge(t)  # leaves: the tensor itself, to take .grad


def _scalar_array(x, like):
    """A Python number or a raw array as an array of the other operand's device.

    The dtype policy is one for both: next to a floating-point tensor the operand takes the
    tensor's dtype (a float32 graph stays float32 with a float64 NumPy operand, as with a
    Python float); next to an integer tensor a Python int takes its dtype and an array keeps
    its own, promoted as NumPy does.
    """
    xp = like.xp
    if isinstance(x, (bool, int, float)):
        dtype = like.dtype if backend.is_float_dtype(like.dtype) or isinstance(x, int) else None
        if xp is not np:  # filled on the device: no copy from the host (a CUDA graph has none)
            return xp.full((), x, dtype=dtype or np.asarray(x).dtype)
        return xp.asarray(x, dtype=dtype)
    if isinstance(x, np.generic) and xp is not np:  # a NumPy scalar: filled on the device too
        return xp.full((), x, dtype=like.dtype if backend.is_float_dtype(like.dtype) else x.dtype)
    if isinstance(x, (np.ndarray, np.generic)) or backend.is_cupy_array(x):
        if backend.device_of(x) != like.device and np.ndim(x) > 0:
            raise RuntimeError(
                f"array on {backend.device_of(x)} mixed with a tensor on {like.device}"
            )
        if backend.is_float_dtype(like.dtype) and x.dtype != like.dtype:
            return xp.asarray(x).astype(like.dtype)
        return xp.asarray(x)
    raise TypeError(f"cannot combine a Tensor with {type(x).__name__}")


class Tensor:
    """An array with an optional gradient and a link to the Function that made it."""

    __array_priority__ = 1000  # so ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None, device=None):
        if isinstance(data, Tensor):
            data = data.data
        if device is None and (backend.is_cupy_array(data) or isinstance(data, np.ndarray)):
            device = backend.device_of(data)
        device = backend.normalize_device(device)
        dtype = backend.as_dtype(dtype)
        if not (backend.is_cupy_array(data) or isinstance(data, np.ndarray)):
            data = np.asarray(data)
            if dtype is None and data.dtype == np.float64:
                dtype = np.dtype(np.float32)  # Python floats become float32 by default
        if dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
        data = backend.to_device(data, device)
        self._init(data, requires_grad)

    @classmethod
    def _wrap(cls, data, requires_grad=False):
        t = cls.__new__(cls)
        t._init(data, requires_grad)
        return t

    def _init(self, data, requires_grad):
        if requires_grad and not backend.is_float_dtype(data.dtype):
            raise TypeError(f"only floating-point tensors can require grad, not {data.dtype}")
        self.data = data
        self._version = [0]  # in-place changes so far: a cell that detach() shares
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None
        self._generation = 0
        self._retain = False

    # ---- properties ------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    xp = property(lambda self: backend.get_array_module(self.data))
    is_leaf = property(lambda self: self._ctx is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = "" if self.device == "cpu" else f", device='{self.device}'"
        return f"Tensor({self.numpy()!r}{dev}{grad})".replace("\n", "\n       ")

    # ---- conversion ------------------------------------------------------------------
    def numpy(self):
        """The data as a NumPy array (copied from the GPU when on CUDA)."""
        return backend.to_device(self.data, "cpu")

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, not shape {self.shape}")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self):
        """The same data, cut from the graph (in-place changes count for both)."""
        t = Tensor._wrap(self.data)
        t._version = self._version
        return t

    def to(self, device=None, dtype=None):
        """A copy on another device and/or dtype. A dtype change is differentiable."""
        out = self
        if dtype is not None and backend.as_dtype(dtype) != self.dtype:
            out = ops.cast(out, dtype)
        if device is not None and backend.normalize_device(device) != self.device:
            out = ops.to_device(out, device)
        return out

    def requires_grad_(self, flag=True):
        if flag and not backend.is_float_dtype(self.dtype):
            raise TypeError(f"only floating-point tensors can require grad, not {self.dtype}")
        self.requires_grad = flag
        return self

    def retain_grad(self):
        """Keep .grad on this non-leaf tensor after backward (leaves always keep theirs)."""
        self._retain = True
        return self

    def zero_grad(self):
        self.grad = None

    # ---- in place -------------------------------------------------------------------------
    # Not differentiable: refused on a tensor that requires grad while the graph is recorded
    # (an optimizer-style update goes inside no_grad). Each bumps the version.
    def bump_version(self):
        """Record an in-place change made to .data directly (as an optimizer step does)."""
        self._version[0] += 1

    def _in_place(self, name):
        if self.requires_grad and _grad_mode.enabled:
            raise RuntimeError(
                f"{name} changes a tensor that requires grad in place; do it inside no_grad() "
                "(an update), or use the out-of-place op"
            )
        self.bump_version()

    def _operand(self, other):
        other = other.data if isinstance(other, Tensor) else other
        return _scalar_array(other, self) if not isinstance(other, (int, float, bool)) else other

    def __setitem__(self, key, value):
        self._in_place("t[key] = value")
        self.data[key] = self._operand(value)

    def copy_(self, other):
        self._in_place("copy_")
        self.data[...] = self._operand(other)
        return self

    def add_(self, other):
        self._in_place("add_")
        self.data += self._operand(other)
        return self

    def mul_(self, other):
        self._in_place("mul_")
        self.data *= self._operand(other)
        return self

    def zero_(self):
        self._in_place("zero_")
        self.data[...] = 0
        return self

    # ---- backward ---------------------------------------------------------------------
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) into every leaf's .grad.

        `grad` is the upstream gradient, required unless self has one element (then 1).
        Unless `retain_graph`, each Function drops its saved arrays once used, so the
        intermediate arrays are freed and a second backward through them raises.
        """
        grad = self._output_grad(grad, "backward()")
        if self._ctx is None:
            self._accumulate(grad)
            return
        for x, g, fresh in _walk(self._ctx, grad, retain_graph):
            if x._ctx is None:  # a leaf: keep the gradient
                x._accumulate(g, fresh)
                continue
            t = x.tensor()
            if t is not None and t._retain:
                t._accumulate(g)

    def _output_grad(self, grad, caller):
        """The upstream gradient of the walk's start as an array of self's shape and dtype."""
        if not self.requires_grad:
            raise RuntimeError(f"{caller} on a tensor that does not require grad")
        xp = self.xp
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"{caller} on a tensor of shape {self.shape} needs an explicit gradient "
                    "(only one-element tensors get the implicit gradient 1)"
                )
            return xp.ones_like(self.data)
        grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad)
        if grad.shape != self.shape:
            raise ValueError(f"gradient of shape {grad.shape} for a tensor of shape {self.shape}")
        return grad.astype(self.dtype, copy=False)

    def _accumulate(self, g, fresh=False):
        # A copy unless g is fresh (Function.fresh_grads): the same gradient array may be
        # routed to several inputs, and .grad is changed in place (clipping).
        if self.grad is None:
            self.grad = g if fresh else g.copy()
        else:
            self.grad = fast.add(self.grad, g)

    # ---- operators (the ops module does the work) ------------------------------------------
    def __add__(self, other):
        return ops.add(self, other)

    def __radd__(self, other):
        return ops.add(other, self)

    def __sub__(self, other):
        return ops.sub(self, other)

    def __rsub__(self, other):
        return ops.sub(other, self)

    def __mul__(self, other):
        return ops.mul(self, other)

    def __rmul__(self, other):
        return ops.mul(other, self)

    def __truediv__(self, other):
        return ops.div(self, other)

    def __rtruediv__(self, other):
        return ops.div(other, self)

    def __pow__(self, other):
        return ops.pow(self, other)

    def __rpow__(self, other):
        return ops.pow(other, self)

    def __matmul__(self, other):
        return ops.matmul(self, other)

    def __rmatmul__(self, other):
        return ops.matmul(other, self)

    def __neg__(self):
        return ops.neg(self)

    def __getitem__(self, key):
        return ops.getitem(self, key)

    # comparisons give boolean tensors outside the graph
    def _compare(self, other, op):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor._wrap(op(self.data, other))

    def __lt__(self, other):
        return self._compare(other, lambda a, b: a < b)

    def __le__(self, other):
        return self._compare(other, lambda a, b: a <= b)

    def __gt__(self, other):
        return self._compare(other, lambda a, b: a > b)

    def __ge__(self, other):
        return self._compare(other, lambda a, b: a >= b)

    def eq(self, other):
        return self._compare(other, lambda a, b: a == b)

    __hash__ = object.__hash__

    # ---- methods mirroring the ops ---------------------------------------------------------
    def sum(self, axis=None, keepdims=False):
        return ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return ops.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return ops.max(self, axis, keepdims)

    def var(self, axis=None, keepdims=False, ddof=0):
        return ops.var(self, axis, keepdims, ddof)

    def reshape(self, *shape):
        return ops.reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)

    def view(self, *shape):
        return self.reshape(*shape)

    def transpose(self, *axes):
        return ops.transpose(self, axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else (axes or None))

    def permute(self, *axes):
        return self.transpose(*axes)

    def swapaxes(self, a, b):
        return ops.swapaxes(self, a, b)

    @property
    def T(self):
        return ops.transpose(self, None)

    @property
    def mT(self):
        return ops.swapaxes(self, -1, -2)

    def expand(self, *shape):
        return ops.broadcast_to(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)

    def broadcast_to(self, shape):
        return ops.broadcast_to(self, shape)

    def squeeze(self, axis=None):
        return ops.squeeze(self, axis)

    def unsqueeze(self, axis):
        return ops.unsqueeze(self, axis)

    def flatten(self):
        return ops.reshape(self, (-1,))

    def exp(self):
        return ops.exp(self)

    def log(self):
        return ops.log(self)

    def sqrt(self):
        return ops.sqrt(self)

    def rsqrt(self):
        return ops.rsqrt(self)

    def tanh(self):
        return ops.tanh(self)

    def sigmoid(self):
        return ops.sigmoid(self)

    def relu(self):
        return ops.relu(self)

    def abs(self):
        return ops.abs(self)

    def clip(self, lo=None, hi=None):
        return ops.clip(self, lo, hi)

    def softmax(self, axis=-1):
        return ops.softmax(self, axis)

    def log_softmax(self, axis=-1):
        return ops.log_softmax(self, axis)

    def astype(self, dtype):
        return ops.cast(self, dtype)

    def float(self):
        return ops.cast(self, "float32")

    def split(self, sizes, axis=0):
        return ops.split(self, sizes, axis)


def _addends(fn, pending, owned, watched):
    """What `fn` may add into its gradients: for each input, the sum so far of the gradient
    pieces of a non-leaf that no caller watches (not retained, not asked for by grad()), else
    None, and whether that array is the walk's own (fn may write into it); (None, None) when
    there is none. An input given twice gets it once."""
    out, mine, seen = [], [], set()
    for x in fn.inputs:
        a = None
        if x is not None and x._ctx is not None and id(x._ctx) not in seen | watched:
            seen.add(id(x._ctx))
            t = x.tensor()
            if t is None or not t._retain:
                a = pending.get(id(x._ctx))
        out.append(a)
        mine.append(a is not None and id(x._ctx) in owned)
    return (out, mine) if any(a is not None for a in out) else (None, None)


def _walk(ctx, grad, retain_graph, watched=frozenset()):
    """The backward walk from the Function `ctx` whose output has gradient `grad`.

    Yields (x, g) for every gradient g a Function hands to one of its inputs x: a leaf
    tensor, or the _Edge of a non-leaf (several pieces for an input used several times; the
    caller sums them). The pieces reaching a non-leaf's creator are summed here and passed
    on. Every consumer of a tensor runs before its creator (the heap pops the deepest
    generation first), so a creator sees its output's whole gradient.

    Each yield is (x, g, fresh): fresh when g is a new array nothing else holds
    (Function.fresh_grads), which a leaf may keep as it is. A Function that takes addends
    (Function.takes_addends) adds the sum so far into its own gradient of a non-leaf; that
    total replaces the sum and is not yielded. So it never is for a non-leaf a caller reads:
    a retained one, or one whose creator is in `watched`. A sum the walk made, or a fresh
    gradient, is the walk's own: a Function that takes it may accumulate into it in place.
    """
    order = itertools.count()  # tie-break so the heap never compares Functions
    pending = {id(ctx): grad}  # Function -> gradient of its output
    owned = set()  # Functions whose pending gradient no one else holds
    heap = [(-ctx.generation, next(order), ctx)]
    while heap:
        _, _, fn = heapq.heappop(heap)
        if getattr(fn, "_freed", False):
            raise RuntimeError(
                "backward through a graph a second time: its saved arrays were freed "
                "(pass retain_graph=True to the first backward)"
            )
        _check_versions(fn)
        g_out = pending.pop(id(fn))
        owned.discard(id(fn))
        if fn.takes_addends:
            fn.addends, fn.owned = _addends(fn, pending, owned, watched)
        input_grads = fn.backward(g_out)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        addends = fn.addends
        for i, (x, g) in enumerate(zip(fn.inputs, input_grads)):
            if x is None or g is None:
                continue
            fresh = fn.fresh_grads
            g = backend.sum_to(g, x.shape)
            if g.dtype != x.dtype:
                g, fresh = g.astype(x.dtype), True
            if addends is not None and addends[i] is not None:
                pending[id(x._ctx)] = g  # the whole gradient so far: the sum is in it
                (owned.add if fresh else owned.discard)(id(x._ctx))
                continue
            yield x, g, fresh
            if x._ctx is None:
                continue
            key = id(x._ctx)
            if key in pending:
                pending[key] = fast.add(pending[key], g)  # a fresh array: g may be routed elsewhere too
                owned.add(key)
            else:
                pending[key] = g
                if fresh:
                    owned.add(key)
                heapq.heappush(heap, (-x._ctx.generation, next(order), x._ctx))
        if not retain_graph:
            generation = fn.generation  # kept, so a later walk reaches the clear error above
            fn.__dict__.clear()
            fn.generation, fn._freed = generation, True


def grad(output, inputs, grad_output=None, retain_graph=False, allow_unused=False):
    """The gradients d(output)/d(input) for each tensor of `inputs`, as a list of arrays.

    The same walk as `output.backward(grad_output)`, but no `.grad` is touched: the
    gradients are returned (fresh arrays, summed over every use of an input). So several
    threads can differentiate their own graphs over the same parameters at once and combine
    the results as they choose. An input may be a leaf or an intermediate tensor; one that
    the output does not depend on raises, or gets None with `allow_unused=True`.
    """
    if isinstance(inputs, Tensor):
        raise TypeError("grad: inputs must be a list of tensors (wrap one tensor in a list)")
    inputs = list(inputs)
    slots = {}  # a leaf by id, a non-leaf by id of its creator (each Function has one output)
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(f"grad: input {i} is a {type(t).__name__}, not a Tensor")
        if not t.requires_grad:
            raise RuntimeError(f"grad: input {i} (shape {t.shape}) does not require grad")
        slots.setdefault(id(t) if t._ctx is None else id(t._ctx), []).append(i)
    g0 = output._output_grad(grad_output, "grad()")
    found = [None] * len(inputs)

    def add(key, g):
        for i in slots.get(key, ()):
            found[i] = g.copy() if found[i] is None else found[i] + g

    if output._ctx is None:
        add(id(output), g0)
    else:
        add(id(output._ctx), g0)
        for x, g, _ in _walk(output._ctx, g0, retain_graph, frozenset(slots)):
            add(id(x) if x._ctx is None else id(x._ctx), g)
    missing = [i for i, g in enumerate(found) if g is None]
    if missing and not allow_unused:
        i = missing[0]
        raise RuntimeError(
            f"grad: input {i} (shape {inputs[i].shape}) is not part of the output's graph "
            "(it gets no gradient; pass allow_unused=True to get None for it)"
        )
    return found


def tensor(data, requires_grad=False, dtype=None, device=None):
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


def _factory(fill, shape, dtype, device, requires_grad):
    xp = backend.xp_for_device(device)
    dtype = backend.as_dtype(dtype) or np.dtype(np.float32)
    device = backend.normalize_device(device)
    if device.startswith("cuda:"):
        with xp.cuda.Device(int(device[5:])):
            return Tensor._wrap(fill(xp, shape, dtype), requires_grad)
    return Tensor._wrap(fill(xp, shape, dtype), requires_grad)


def _shape(shape):
    return tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else tuple(shape)


def zeros(*shape, dtype=None, device=None, requires_grad=False):
    return _factory(lambda xp, s, d: xp.zeros(s, d), _shape(shape), dtype, device, requires_grad)


def ones(*shape, dtype=None, device=None, requires_grad=False):
    return _factory(lambda xp, s, d: xp.ones(s, d), _shape(shape), dtype, device, requires_grad)


def randn(*shape, dtype=None, device=None, requires_grad=False, std=1.0):
    """Normal(0, std) samples from the engine's seeded generator."""
    dev = backend.normalize_device(device)

    def fill(xp, s, d):
        return (backend.rng(dev).standard_normal(s, dtype=np.float32) * std).astype(d)

    return _factory(fill, _shape(shape), dtype, device, requires_grad)


def arange(n, dtype="int64", device=None):
    return _factory(lambda xp, s, d: xp.arange(n, dtype=d), (), dtype, device, False)


from autograd import ops  # noqa: E402  (ops builds on Tensor and Function above)
