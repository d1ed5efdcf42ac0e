"""Optimizers, learning-rate schedules and gradient clipping.

An optimizer holds `param_groups`: a list of dicts, each with its `params` (Tensors) and its
hyperparameters (`lr`, `weight_decay`, ...). `step()` reads every parameter's `.grad` and
updates `.data` in place; the per-parameter state (momentum buffers, Adam moments) is
allocated once, on the parameter's device and in its dtype, and updated with in-place array
ops (`out=`), so a step makes no new arrays beyond one shared scratch buffer. NumPy and CuPy
arrays work alike: every op goes through the parameter array's own module.

    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)   # no decay on 1-D params
    sched = CosineSchedule(max_lr=1e-3, warmup_steps=100, total_steps=2000, min_lr=1e-4)
    for step in range(2000):
        sched.apply(opt, step)
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
"""

import math

import numpy as np

from autograd import backend, fast
from autograd.fast.cuda import graph
from autograd.fast.cuda import kernels as cuda


def _param_array(p):
    return p.data


# ---- optimizers --------------------------------------------------------------------------

class Optimizer:
    """Base class: parameter groups, zero_grad, state_dict / load_state_dict.

    `params` is an iterable of Tensors, or of dicts `{"params": [...], **hyperparameters}`
    (parameter groups: a group's own values override the optimizer's defaults).
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty list of parameters")
        groups = params if isinstance(params[0], dict) else self._default_groups(params)
        self.param_groups = []
        seen = set()
        for g in groups:
            group = dict(self.defaults)
            group.update(g)
            group["params"] = list(g["params"])
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__}: a parameter appears in two groups")
                seen.add(id(p))
                if not getattr(p, "requires_grad", False):
                    raise ValueError(
                        f"{type(self).__name__}: parameter of shape {p.shape} does not require grad")
            self.param_groups.append(group)
        self.state = {}  # id(param) -> dict of arrays
        self.step_count = 0
        self._scratch = {}

    def _default_groups(self, params):
        return [{"params": params}]

    def parameters(self):
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def _buffer(self, p, name):
        """The state array `name` of parameter p: zeros of p's shape, made on first use."""
        st = self.state.setdefault(id(p), {})
        if name not in st:
            st[name] = backend.get_array_module(p.data).zeros_like(p.data)
        return st[name]

    def _tmp(self, a):
        """A scratch array shaped like `a`: a view into one buffer shared by all parameters."""
        xp = backend.get_array_module(a)
        key = (a.dtype.str, backend.device_of(a))
        buf = self._scratch.get(key)
        if buf is None or buf.size < a.size:
            buf = xp.empty(a.size, dtype=a.dtype)
            self._scratch[key] = buf
        return buf[: a.size].reshape(a.shape)

    # ---- state -------------------------------------------------------------------------
    _STATE_NAMES = ()
    _HYPER = ()

    def state_dict(self):
        """A plain dict: step count, each group's hyperparameters, and the state arrays of every
        parameter, keyed by its position in `parameters()` (NumPy copies, picklable)."""
        params = self.parameters()
        state = {}
        for i, p in enumerate(params):
            st = self.state.get(id(p))
            if st:
                state[i] = {k: backend.to_device(v, "cpu").copy() for k, v in st.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
                  for g in self.param_groups]
        return {"type": type(self).__name__, "step": self.step_count, "groups": groups,
                "state": state}

    def load_state_dict(self, sd):
        """Restore what `state_dict` returned; checks that the groups and shapes fit."""
        name = type(self).__name__
        if sd.get("type", name) != name:
            raise ValueError(f"optimizer state is for {sd['type']}, not {name}")
        if len(sd["groups"]) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(sd['groups'])} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(sd["groups"], self.param_groups)):
            if saved["n_params"] != len(group["params"]):
                raise ValueError(f"optimizer state group {i} has {saved['n_params']} parameters, "
                                 f"this optimizer's has {len(group['params'])}")
        params = self.parameters()
        for i, st in sd["state"].items():
            p = params[int(i)]
            for k, v in st.items():
                if tuple(v.shape) != p.shape:
                    raise ValueError(f"optimizer state {k!r} of parameter {i} has shape "
                                     f"{tuple(v.shape)}, the parameter has shape {p.shape}")
        for saved, group in zip(sd["groups"], self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "n_params"})
        self.state = {}
        for i, st in sd["state"].items():
            p = params[int(i)]
            self.state[id(p)] = {k: backend.to_device(np.asarray(v), p.device).astype(p.dtype)
                                 for k, v in st.items()}
        self.step_count = int(sd["step"])


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, PyTorch's formulation.

        g <- g + weight_decay * p              (L2 penalty, coupled to the gradient)
        b <- momentum * b + (1 - dampening) g  (b = g on the first step)
        d <- g + momentum * b  if nesterov else b
        p <- p - lr * d
    """

    def __init__(self, params, lr=1e-2, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening == 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def step(self):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd:
                    g = g + wd * p.data
                if mu:
                    new = id(p) not in self.state or "momentum" not in self.state[id(p)]
                    b = self._buffer(p, "momentum")
                    if new:
                        b[...] = g
                    else:
                        b *= mu
                        if group["dampening"]:
                            b += (1 - group["dampening"]) * g
                        else:
                            b += g
                    if group["nesterov"]:
                        g = g + mu * b
                    else:
                        g = b
                tmp = self._tmp(p.data)
                backend.get_array_module(p.data).multiply(g, lr, out=tmp)
                p.data -= tmp
                p.bump_version()  # a graph still holding p.data raises at its backward
        self.step_count += 1


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's formulation.

    At step t (from 1), with gradient g:
        p <- p (1 - lr * weight_decay)           (decay applied to the weight, not the gradient)
        m <- beta1 m + (1 - beta1) g             (first moment)
        v <- beta2 v + (1 - beta2) g^2           (second moment)
        m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)   (bias correction: m, v start at 0)
        p <- p - lr * m_hat / (sqrt(v_hat) + eps)

    Given a plain list of parameters, it makes two groups: matrices (ndim >= 2) get
    `weight_decay`, vectors and scalars (norm weights, biases) get none. Pass
    `decay_1d=True`, or your own groups, to choose otherwise.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 decay_1d=False):
        if not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        self.decay_1d = decay_1d
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    def _default_groups(self, params):
        if self.decay_1d:
            return [{"params": params}]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay}] if decay else []
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def step(self, norm_sq=None, max_norm=0.0):
        """One update of every parameter with a gradient. `norm_sq`: the squared global
        gradient norm as a GPU array (a captured step, see optim.clip_grad_norm_on_device):
        the kernel then skips the update when it is not finite. `max_norm` (with norm_sq):
        update with the gradients clipped to this global norm, as clip_grad_norm would scale
        them, without writing them (the fused kernel scales each gradient as it reads it)."""
        if max_norm and norm_sq is None:
            raise ValueError("AdamW.step: max_norm needs norm_sq, the squared gradient norm")
        clip_scale = None  # the non-fused path's clipping: the norm read on the host
        capture = graph.active()
        if capture is None:
            self.step_count += 1
        else:  # a captured step counts at each replay, before its slots read the count
            capture.on_replay(self._count_step)
        t = self.step_count
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            b1, b2 = group["betas"]
            step_size = lr / (1 - b1**t)
            bc2_sqrt = math.sqrt(1 - b2**t)
            fused = []  # on the GPU: every parameter of the group in one kernel launch
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                xp = backend.get_array_module(p.data)
                m = self._buffer(p, "exp_avg")
                v = self._buffer(p, "exp_avg_sq")
                w = p.data
                p.bump_version()  # updated in place below: a graph still holding it raises
                if fast.cuda_float32(w, g) and w.flags.c_contiguous and g.flags.c_contiguous:
                    fused.append((w, g, m, v))
                    continue
                if capture is not None:  # its lr and step count would be fixed at capture
                    raise graph.CaptureError(f"AdamW: a {w.dtype} parameter is updated outside "
                                             "the fused GPU kernel, which a captured step needs")
                if max_norm:
                    if clip_scale is None:
                        norm = math.sqrt(float(norm_sq.reshape(-1)[0]))
                        clip_scale = max_norm / (norm + 1e-6) if math.isfinite(norm) else 1.0
                    if clip_scale < 1:
                        g = g * g.dtype.type(clip_scale)
                tmp = self._tmp(p.data)
                if wd:
                    w *= 1 - lr * wd
                # m += (1 - b1) (g - m): the same lerp PyTorch uses
                xp.subtract(g, m, out=tmp)
                tmp *= 1 - b1
                m += tmp
                # v = b2 v + (1 - b2) g g
                xp.multiply(g, g, out=tmp)
                tmp *= 1 - b2
                v *= b2
                v += tmp
                # w -= step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
                xp.sqrt(v, out=tmp)
                tmp /= bc2_sqrt
                tmp += eps
                xp.divide(m, tmp, out=tmp)
                tmp *= step_size
                w -= tmp
            if fused:
                hp = None  # a captured step reads lr and the bias corrections from its slots
                if capture is not None:
                    hp = capture.slot(lambda group=group: self._slot_values(group), np.float32, 3)
                cuda.adamw_step(*map(list, zip(*fused)), lr, b1, b2, eps, wd, 1 - b1**t, 1 - b2**t,
                                hp=hp, sumsq=norm_sq, max_norm=max_norm)

    def _count_step(self):
        self.step_count += 1

    def _slot_values(self, group):
        """(lr, 1 - beta1^t, 1 - beta2^t) of this step, for a captured step's slots."""
        b1, b2 = group["betas"]
        t = self.step_count
        return group["lr"], 1 - b1**t, 1 - b2**t


# ---- gradient clipping -------------------------------------------------------------------

def grad_norm(params):
    """The global L2 norm of all gradients, as a Python float (one device sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and fast.cuda_float32(*grads):  # on the GPU: one kernel over every array, one sync
        return math.sqrt(float(cuda.sum_of_squares(grads)[0]))
    total = None
    for p in params:
        g = p.grad
        if g is None:
            continue
        xp = backend.get_array_module(g)
        flat = g.reshape(-1)
        if flat.dtype.itemsize < 4:
            flat = flat.astype(np.float32)
        sq = xp.dot(flat, flat)  # a BLAS dot: fast, no temporary array
        total = sq if total is None else total + sq
    return 0.0 if total is None else math.sqrt(float(total))


def clip_grad_norm(params, max_norm, norm=None):
    """Scale all gradients together so their global L2 norm is at most `max_norm`.

    Returns the norm before clipping. As in PyTorch, the scale is max_norm / (norm + 1e-6)
    when that is below 1. A non-finite norm leaves the gradients untouched (the caller sees
    the inf/nan it returns and decides). `norm`: the norm when the caller knows it already
    (e.g. summed over the ranks of data-parallel training, each holding a slice).
    """
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params) if norm is None else norm
    if math.isfinite(total):
        scale = max_norm / (total + 1e-6)
        if scale < 1:
            grads = [p.grad for p in params]
            if fast.cuda_float32(*grads) and all(g.flags.c_contiguous for g in grads):
                cuda.scale_(grads, scale)  # one launch on the GPU
                return total
            for p in params:
                p.grad *= p.grad.dtype.type(scale)
    return total


def clip_grad_norm_on_device(params, max_norm):
    """clip_grad_norm for float32 GPU gradients without reading the norm on the host (a
    captured step cannot): returns the squared global norm as a 1-element GPU array; the
    kernel scales the gradients when max_norm / (norm + 1e-6) < 1 and the norm is finite.
    max_norm 0: no clipping, the norm only."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not fast.cuda_float32(*grads) or not all(g.flags.c_contiguous for g in grads):
        raise TypeError("clip_grad_norm_on_device: the gradients must be contiguous float32 "
                        "CuPy arrays, with the fast paths on")
    norm_sq = cuda.sum_of_squares(grads)
    if max_norm:
        cuda.clip_(grads, norm_sq, max_norm)
    return norm_sq


# ---- learning-rate schedules -------------------------------------------------------------

class Schedule:
    """lr as a function of the step (counted from 0): `lr_at(step)` or `sched(step)`.

    Every schedule starts with a linear warmup over `warmup_steps`: step s < warmup_steps gets
    max_lr * (s + 1) / warmup_steps, so the last warmup step reaches max_lr.
    """

    def __init__(self, max_lr, warmup_steps=0, total_steps=None, min_lr=0.0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.max_lr, self.warmup_steps = float(max_lr), int(warmup_steps)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.min_lr = float(min_lr)

    def lr_at(self, step):
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        return self.after_warmup(self.progress(step))

    __call__ = lr_at

    def progress(self, step):
        """0 at the end of warmup, 1 at total_steps (and after)."""
        if self.total_steps is None:
            return 0.0
        span = max(1, self.total_steps - self.warmup_steps)
        return min(1.0, max(0.0, (step - self.warmup_steps) / span))

    def after_warmup(self, progress):
        raise NotImplementedError

    def apply(self, optimizer, step):
        """Set every group's lr for `step` (a group's `lr_scale`, default 1, multiplies it)."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self):
        return {"type": type(self).__name__, "max_lr": self.max_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr": self.min_lr}

    def __repr__(self):
        return (f"{type(self).__name__}(max_lr={self.max_lr}, warmup_steps={self.warmup_steps}, "
                f"total_steps={self.total_steps}, min_lr={self.min_lr})")


class CosineSchedule(Schedule):
    """Warmup, then half a cosine from max_lr down to min_lr at total_steps (then min_lr)."""

    def __init__(self, max_lr, warmup_steps, total_steps, min_lr=0.0):
        super().__init__(max_lr, warmup_steps, total_steps, min_lr)

    def after_warmup(self, progress):
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.max_lr - self.min_lr)


class LinearSchedule(Schedule):
    """Warmup, then a straight line from max_lr down to min_lr at total_steps."""

    def __init__(self, max_lr, warmup_steps, total_steps, min_lr=0.0):
        super().__init__(max_lr, warmup_steps, total_steps, min_lr)

    def after_warmup(self, progress):
        return self.max_lr + progress * (self.min_lr - self.max_lr)


class ConstantSchedule(Schedule):
    """Warmup, then max_lr for ever."""

    def after_warmup(self, progress):
        return self.max_lr


SCHEDULES = {"cosine": CosineSchedule, "linear": LinearSchedule, "constant": ConstantSchedule}


def make_schedule(name, max_lr, warmup_steps=0, total_steps=None, min_lr=0.0):
    """A schedule by name: 'cosine' (the default elsewhere), 'linear' or 'constant'."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: expected one of {', '.join(SCHEDULES)}")
    if name == "constant":
        return ConstantSchedule(max_lr, warmup_steps, total_steps, min_lr)
    if total_steps is None:
        raise ValueError(f"schedule {name!r} needs total_steps")
    return SCHEDULES[name](max_lr, warmup_steps, total_steps, min_lr)
