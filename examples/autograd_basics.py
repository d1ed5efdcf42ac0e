"""The engine in five minutes: gradients, a gradient check, and a tiny network learning XOR.

    python examples/autograd_basics.py
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autograd  # noqa: E402
from autograd import Tensor, gradcheck, nn, ops, optim  # noqa: E402

# 1. Gradients of a small expression: L = sum(tanh(x @ w)^2)
x = Tensor([[1.0, 2.0, 3.0]], requires_grad=True)
w = Tensor([[0.5], [-1.0], [2.0]], requires_grad=True)
loss = ((x @ w).tanh() ** 2).sum()
loss.backward()
print("loss", loss.item())
print("dL/dx", x.grad)
print("dL/dw", w.grad.ravel())

# 2. The same gradients checked against central differences (float64, a random upstream gradient)
xd = Tensor(x.numpy().astype(np.float64), requires_grad=True)
wd = Tensor(w.numpy().astype(np.float64), requires_grad=True)
print("gradcheck:", gradcheck(lambda x, w: (x @ w).tanh() ** 2, [xd, wd]))


# 3. A two-layer network learns XOR (not linearly separable) with AdamW
class MLP(nn.Module):
    def __init__(self):
        self.hidden = nn.Linear(2, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.hidden(x).tanh())


autograd.manual_seed(0)
inputs = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
labels = np.array([0, 1, 1, 0])
model = MLP()
opt = optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
for step in range(201):
    logits = model(Tensor(inputs))
    loss = ops.cross_entropy(logits, labels)
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")
with autograd.no_grad():
    predicted = model(Tensor(inputs)).numpy().argmax(axis=1)
print("XOR predictions", predicted.tolist(), "(want [0, 1, 1, 0])")
