"""Activation checkpointing: trade one more forward for the memory of the activations.

`checkpoint(fn, *inputs, params=...)` returns `fn(*inputs)` without recording a graph inside
fn, so none of fn's intermediate arrays outlive the call: only the inputs are kept. Backward
runs fn again on them, this time recording, and differentiates that graph with
`autograd.grad` (which hands the gradients back instead of touching `.grad`). Wrapped around
each transformer block, memory holds the blocks' inputs plus one block's activations at a
time, instead of every block's activations, for one more forward of each block in backward.

`params` are the tensors fn reads besides its inputs (a module's parameters): they become
inputs of the checkpoint in the graph, so their gradients reach `.grad` (or `autograd.grad`)
as if fn had run unwrapped.

Random numbers drawn inside fn (dropout) are replayed: every draw of the engine on any device
starts from the CPU generator (the GPU's masks are hashed from seeds it draws), whose state is
saved before fn runs and restored for the rerun.
"""

from autograd import backend
from autograd.tensor import Function, Tensor, enable_grad, grad, no_grad


class Checkpoint(Function):
    def __init__(self, fn, n_inputs, params):
        self.fn, self.n, self.params = fn, n_inputs, params

    def forward(self, *arrays):
        self.x = arrays[:self.n]  # the inputs' arrays: all that is kept (params are tensors)
        self.rng_state = backend.rng("cpu").bit_generator.state
        with no_grad():
            y = self.fn(*(Tensor(a) for a in self.x))
        if not isinstance(y, Tensor):
            raise TypeError(f"checkpoint: fn must return one Tensor, not {type(y).__name__}")
        return y.data

    def backward(self, g):
        generator = backend.rng("cpu").bit_generator
        now, generator.state = generator.state, self.rng_state  # replay fn's random draws
        xs = [Tensor(a, requires_grad=need) for a, need in zip(self.x, self.needs_grad)]
        with enable_grad():
            y = self.fn(*xs)
        generator.state = now
        tensors = xs + list(self.params)
        wanted = [t for t, need in zip(tensors, self.needs_grad) if need]
        found = iter(grad(y, wanted, g, allow_unused=True) if wanted else ())
        return tuple(next(found) if need else None for need in self.needs_grad)


def checkpoint(fn, *inputs, params=()):
    """fn(*inputs), recomputed in backward instead of stored; `params`: the other tensors fn
    reads whose gradients are wanted (e.g. `module.parameters()`)."""
    for i, t in enumerate(list(inputs) + list(params)):
        if not isinstance(t, Tensor):
            raise TypeError(f"checkpoint: input {i} is a {type(t).__name__}, not a Tensor")
    params = list(params)
    return Checkpoint(fn, len(inputs), params).apply(*inputs, *params)
