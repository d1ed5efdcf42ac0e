"""autograd: a small reverse-mode automatic differentiation engine on NumPy or CuPy arrays.

    import autograd
    from autograd import Tensor
    x = Tensor([[1.0, 2.0]], requires_grad=True)
    y = (x * x).sum()
    y.backward()        # x.grad == 2 * x
    (gx,) = autograd.grad((x * x).sum(), [x])   # the same gradient, returned; .grad untouched

It knows nothing of language models: Tensor and the graph walk (tensor.py), the reference ops
with their backward (ops/, one module per family), their tuned implementations (fast/: CPU
code and CUDA kernels, each checked against its reference), mixed precision (amp.py), array
backends (backend.py), building blocks (nn.py), optimizers and learning-rate schedules
(optim.py), activation checkpointing (checkpoint.py), gradient checking (gradcheck.py, testing.py), and data
parallelism over devices (distributed.py: NCCL collectives, bucketed gradient sums, ZeRO-1;
imported on its own).
"""

from autograd import backend
from autograd.backend import (
    cuda_available,
    default_device,
    get_rng_state,
    manual_seed,
    set_default_device,
    set_rng_state,
)
from autograd.gradcheck import GradcheckError, gradcheck
from autograd.ops import (
    abs, add, broadcast_to, cast, clip, concat, cross_entropy, div, dropout, embedding, exp,
    gelu, getitem, layer_norm, linear, linear_cross_entropy, log, log_sigmoid, log_softmax,
    lora_linear, matmul, max, maximum, mean, mul, neg, pow, relu, reshape, rms_norm, rope, rsqrt,
    scaled_dot_product_attention, sigmoid, silu, softmax, softplus, swiglu, split, sqrt, squeeze,
    stack,
    sub, sum, swapaxes, tanh, to_device, transpose, unsqueeze, var, where,
)
from autograd.tensor import (
    Function, Tensor, arange, enable_grad, grad, is_grad_enabled, no_grad, ones, randn, tensor, zeros,
)
from autograd.checkpoint import checkpoint
from autograd import amp, nn, optim  # noqa: E402  (submodules, as autograd.nn etc.)
