"""The differentiable ops: reference Functions, one module per family, and their functions.

Each family module holds its Functions (forward and backward side by side, on NumPy or CuPy
arrays, the derivative in a comment) and the public functions that check their arguments
and apply them. A function whose op has tuned implementations asks `autograd.fast.pick` for
the class to apply; everything else is the reference itself.

    elementwise  add sub mul div pow maximum neg exp log sqrt rsqrt abs clip cast to_device where
    activations  tanh sigmoid softplus log_sigmoid relu silu swiglu gelu
    reduce       sum mean max var
    shape        reshape transpose swapaxes broadcast_to squeeze unsqueeze concat stack split getitem
    linalg       matmul linear lora_linear
    norm         layer_norm rms_norm
    losses       softmax log_softmax cross_entropy linear_cross_entropy
    attention    scaled_dot_product_attention
    embedding    embedding
    dropout      dropout
    rope         rope
"""

from autograd.ops.elementwise import (
    abs, add, cast, clip, div, exp, log, maximum, mul, neg, pow, rsqrt, sqrt, sub, to_device, where,
)
from autograd.ops.activations import gelu, log_sigmoid, relu, sigmoid, silu, softplus, swiglu, tanh
from autograd.ops.reduce import max, mean, sum, var
from autograd.ops.shape import (
    broadcast_to, concat, getitem, reshape, split, squeeze, stack, swapaxes, transpose, unsqueeze,
)
from autograd.ops.linalg import linear, lora_linear, matmul
from autograd.ops.norm import layer_norm, rms_norm
from autograd.ops.losses import cross_entropy, linear_cross_entropy, log_softmax, softmax
from autograd.ops.attention import scaled_dot_product_attention
from autograd.ops.embedding import embedding
from autograd.ops.dropout import dropout
from autograd.ops.rope import rope

# The public differentiable ops, each with a gradient test (tests/test_ops.py checks the list).
DIFFERENTIABLE_OPS = (
    "add", "sub", "mul", "div", "pow", "maximum", "neg", "exp", "log", "sqrt", "rsqrt", "abs",
    "clip", "cast", "to_device", "where",
    "tanh", "sigmoid", "softplus", "log_sigmoid", "relu", "silu", "swiglu", "gelu",
    "sum", "mean", "max", "var",
    "reshape", "transpose", "swapaxes", "broadcast_to", "squeeze", "unsqueeze", "concat", "stack",
    "split", "getitem",
    "matmul", "linear", "lora_linear",
    "layer_norm", "rms_norm",
    "softmax", "log_softmax", "cross_entropy", "linear_cross_entropy",
    "scaled_dot_product_attention", "embedding", "dropout", "rope",
)
