"""Hypothesis strategies for property-testing ops (importable by anyone writing an op).

    from hypothesis import given
    from autograd.testing import shapes, float_arrays, broadcastable_pair
    @given(float_arrays(shapes()))
    def test_exp(x): ...

Arrays are float64, well conditioned (bounded, away from zero when asked) and, when asked,
away from the kinks where a function is not differentiable (relu and abs at 0, max ties).

Devices: `device_params()` gives the pytest parameters "cpu" and "cuda" (the latter skipped
with a reason when CuPy sees no GPU). It lives here, in the installed package, rather than in
a helper module under tests/, so test files import it the same way from the repo root, from a
clean clone or from an installed copy: `from autograd.testing import device_params`.
"""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def shapes(min_dims=0, max_dims=3, min_side=1, max_side=4):
    """Array shapes, size-1 dimensions included."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


@st.composite
def broadcastable_pair(draw, min_dims=0, max_dims=3, max_side=4):
    """Two shapes that broadcast together: one may have fewer axes or size-1 axes."""
    shape = draw(shapes(min_dims, max_dims, 1, max_side))
    other = draw(hnp.broadcastable_shapes(shape, min_dims=0, max_dims=len(shape), max_side=max_side))
    return (shape, other) if draw(st.booleans()) else (other, shape)


@st.composite
def axes(draw, ndim, allow_none=True, allow_tuple=True):
    """An axis argument for a tensor of `ndim` dimensions: None, an int (maybe negative) or a tuple."""
    choices = []
    if allow_none:
        choices.append(st.none())
    if ndim > 0:
        choices.append(st.integers(-ndim, ndim - 1))
        if allow_tuple:
            choices.append(
                st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple)
            )
    if not choices:
        return None
    return draw(st.one_of(*choices))


@st.composite
def float_arrays(draw, shape, low=-2.0, high=2.0, away_from=None, margin=0.05, distinct=False):
    """float64 arrays with elements in [low, high].

    away_from: a list of points (e.g. [0.0] for relu and abs) every element keeps `margin` from,
    so central differences never straddle a kink. distinct: no two elements within `margin`
    of each other (no ties for max).
    """
    if not isinstance(shape, tuple):
        shape = draw(shape)
    n = int(np.prod(shape))
    values = draw(st.lists(st.floats(low, high, allow_nan=False, allow_infinity=False),
                           min_size=n, max_size=n))
    x = np.array(values, dtype=np.float64)
    for point in away_from or ():
        near = np.abs(x - point) < margin
        x[near] = point + np.where(x[near] >= point, margin, -margin)
    if distinct and n > 1:
        # spread sorted values at least `margin` apart, keeping their order
        order = np.argsort(x, kind="stable")
        x[order] = x[order] + margin * np.arange(n)
    return x.reshape(shape)


def positive_arrays(shape, low=0.2, high=3.0):
    """float64 arrays bounded away from zero (for log, sqrt, division)."""
    return float_arrays(shape, low, high)


@st.composite
def tie_free_pair(draw, shape_a, shape_b, low=-2.0, high=2.0, step=0.2):
    """Two float64 arrays (for maximum) that never tie, even after broadcasting.

    `a` lives on the grid step*k + step/2 and `b` on step*k, so every pair differs by at
    least step/2 and central differences never cross the kink at a == b.
    """
    a = draw(float_arrays(shape_a, low, high))
    b = draw(float_arrays(shape_b, low, high))
    return np.round(a / step) * step + step / 2, np.round(b / step) * step


# ---- devices -----------------------------------------------------------------------------

def available_devices():
    """["cpu"], plus "cuda" when CuPy imports and sees a GPU."""
    from autograd.backend import cuda_available

    return ["cpu", "cuda"] if cuda_available() else ["cpu"]


def device_params():
    """pytest parameters for every device; the cuda one is skipped (with a reason) without a GPU.

        @pytest.mark.parametrize("device", device_params())
        def test_exp(device): ...

    pytest is imported here, not at module import, so the strategies work without it.
    """
    import pytest

    from autograd.backend import cuda_available

    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
            not cuda_available(), reason="CuPy with a CUDA GPU is not available")),
    ]
