"""Gradient checking by central differences, in float64.

For y = f(x1, ..., xn) and a random upstream gradient u (same shape as y), the analytic
gradient of phi(x) = sum(u * f(x)) is what `backward(u)` puts in x.grad. Its numeric
estimate is (phi(x + eps e_j) - phi(x - eps e_j)) / (2 eps) for each element j. A random u,
rather than the gradient of `.sum()`, catches a backward that forgets to multiply by the
incoming gradient.
"""

import numpy as np

from autograd import backend
from autograd.tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """The analytic and numeric gradients disagree (or another check failed)."""


def gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, mode="auto", n_directions=8, seed=0,
              max_full_elements=2048):
    """Check the gradients of `f(*inputs)` with respect to every input that requires grad.

    - mode="full": every element of every input, by central differences;
      mode="fast": `n_directions` random directions per input (v^T J u, cheap for big inputs);
      mode="auto": full when an input has at most `max_full_elements` elements, else fast.
    - Also checks that a zero upstream gradient gives zero input gradients and that two
      backward runs give the same gradients.
    Inputs that require grad must be float64 leaves. Returns True; raises GradcheckError
    naming the input, the worst element's index and both values when a check fails.
    """
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad")
    for i in checked:
        x = inputs[i]
        if x.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {x.dtype}; central differences need float64")
        if not x.is_leaf:
            raise ValueError(f"gradcheck: input {i} is not a leaf tensor")
        if not x.data.flags.c_contiguous:  # (not ascontiguousarray: it turns 0-d into 1-d)
            x.data = x.data.copy()

    out = f(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: f must return a Tensor, not {type(out).__name__}")
    xp = out.xp
    rng = np.random.default_rng(seed)
    u = xp.asarray(rng.standard_normal(out.shape)).astype(out.dtype)

    def analytic(upstream):
        for i in checked:
            inputs[i].grad = None
        y = f(*inputs)
        if not y.requires_grad:
            return [xp.zeros_like(inputs[i].data) for i in checked]
        y.backward(upstream)
        return [inputs[i].grad if inputs[i].grad is not None else xp.zeros_like(inputs[i].data)
                for i in checked]

    grads = analytic(u)
    for i, g in zip(checked, grads):
        if g.shape != inputs[i].shape:
            raise GradcheckError(f"input {i}: gradient of shape {g.shape} for shape {inputs[i].shape}")

    for i, g in zip(checked, analytic(u)):
        first = grads[checked.index(i)]
        if not xp.allclose(g, first, rtol=1e-10, atol=1e-12):
            raise GradcheckError(f"input {i}: two backward runs with the same upstream gradient disagree")

    for i, g in zip(checked, analytic(xp.zeros_like(u))):
        if bool(xp.any(g != 0)):
            raise GradcheckError(f"input {i}: a zero upstream gradient gave a non-zero gradient")

    def phi():
        with no_grad():
            return float(xp.sum(f(*inputs).data * u))

    for i, g in zip(checked, grads):
        x = inputs[i]
        flat = x.data.reshape(-1)  # a view: writing it perturbs x
        full = mode == "full" or (mode == "auto" and x.size <= max_full_elements)
        if full:
            numeric = np.empty(x.size)
            for j in range(x.size):
                orig = flat[j].item()
                flat[j] = orig + eps
                plus = phi()
                flat[j] = orig - eps
                minus = phi()
                flat[j] = orig
                numeric[j] = (plus - minus) / (2 * eps)
            _compare(i, backend.to_device(g, "cpu").reshape(-1), numeric, x.shape, atol, rtol)
        else:
            orig = flat.copy()
            got, want = [], []
            for _ in range(n_directions):
                v = xp.asarray(rng.standard_normal(x.size))
                flat[...] = orig + eps * v
                plus = phi()
                flat[...] = orig - eps * v
                minus = phi()
                flat[...] = orig
                want.append((plus - minus) / (2 * eps))
                got.append(float(xp.sum(g.reshape(-1) * v)))
            _compare(i, np.array(got), np.array(want), None, atol, rtol)
    return True


def _compare(i, analytic, numeric, shape, atol, rtol):
    excess = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
    if excess.size and excess.max() > 0:
        j = int(excess.argmax())
        where = (f"element {tuple(int(k) for k in np.unravel_index(j, shape))}" if shape is not None
                 else f"random direction {j}")
        raise GradcheckError(
            f"input {i}: gradient mismatch at {where}: analytic {analytic[j]:.10g}, "
            f"numeric {numeric[j]:.10g} (atol={atol}, rtol={rtol})"
        )
