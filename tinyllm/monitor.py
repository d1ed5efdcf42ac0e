"""The training-health monitor (`tinyllm train --monitor`): figures of one training step, per
layer, for the metrics file.

    resid_rms[i]     RMS of the residual stream after block i (the block's output)
    attn_rms[i]      RMS of block i's attention output, before it joins the stream
    mlp_rms[i]       RMS of block i's MLP output, likewise
    grad_norm[i]     L2 norm of the gradient of block i's parameters (before clipping)
    update_ratio[i]  ||W_after - W_before|| / ||W_before|| over block i's parameters: the
                     relative size of the optimizer's step (about 1e-3 is healthy)
    embed_grad_norm, embed_update_ratio: the same for the embeddings (and learned positions)
    overflow, underflow, cast_values: float16/bfloat16 casts of the products' operands
                     (autograd.amp.count_casts) that became inf/nan or 0; only under a
                     low-precision mode

RMS figures are over every element of the batch (sqrt of the mean of squares), read through
each block's `probe` during the forward; with the batch split over threads, the slices' sums
are added up. Gradient norms are those of the true gradient (a float16 loss scale divided out).
Cost: a few reductions per layer and one copy of the weights, on monitored steps only; with the
monitor off the model's probes are None and nothing runs.
"""

import math

import numpy as np

from autograd import amp, backend


def _sum_squares(a):
    a = a.ravel()
    return backend.get_array_module(a).vdot(a, a)  # one BLAS dot: no squared copy


class Monitor:
    """Watches `model` (a GPT) through one step at a time:

        monitor.begin()                # before forward/backward: probes on, casts counted
        ... forward and backward ...
        monitor.before_update(scale)   # gradient norms; the weights before the update
        ... optimizer step ...
        figures = monitor.end()        # update ratios; probes off; a dict for the record
    """

    def __init__(self, model):
        self.model = model
        self.n_layers = len(model.blocks)
        self.groups = {}  # "embed" or layer index -> its parameters (those that train)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("blocks."):
                key = int(name.split(".")[1])
            elif name.startswith(("tok_emb.", "pos_emb.")):
                key = "embed"
            else:
                continue  # final norm and an untied head: not per layer
            self.groups.setdefault(key, []).append(p)
        self.grad_norms, self.before = {}, None
        self.sums = []  # (kind, layer, sum of squares (a device scalar), count) from the probes

    def _probe(self, layer, a, m, x):
        for kind, t in (("attn", a), ("mlp", m), ("resid", x)):
            self.sums.append((kind, layer, _sum_squares(t.data), t.size))

    def begin(self):
        self.sums, self.grad_norms, self.before = [], {}, None
        for block in self.model.blocks:
            block.probe = self._probe
        amp.count_casts(True)
        amp.cast_counts(reset=True)

    def before_update(self, grad_scale=1.0):
        """Gradient norms per group (divided by the loss scale) and a copy of the weights."""
        self.grad_norms = {}
        for key, params in self.groups.items():
            sq = sum(float(_sum_squares(p.grad)) for p in params if p.grad is not None)
            self.grad_norms[key] = math.sqrt(sq) / grad_scale
        self.before = {key: [p.data.copy() for p in params] for key, params in self.groups.items()}

    def end(self):
        for block in self.model.blocks:
            block.probe = None
        amp.count_casts(False)
        out = {}
        for kind in ("resid", "attn", "mlp"):
            sq, n = np.zeros(self.n_layers), np.zeros(self.n_layers)
            for k, layer, s, count in self.sums:
                if k == kind:
                    sq[layer] += float(s)
                    n[layer] += count
            out[f"{kind}_rms"] = [float(v) for v in np.sqrt(sq / np.maximum(n, 1))]
        ratios = {}  # none when the step stopped before its update
        for key, params in (self.groups.items() if self.before is not None else ()):
            d2 = w2 = 0.0
            for p, w0 in zip(params, self.before[key]):
                d = p.data - w0
                d2 += float(_sum_squares(d))
                w2 += float(_sum_squares(w0))
            ratios[key] = math.sqrt(d2 / w2) if w2 > 0 else 0.0
        layers = range(self.n_layers)
        out["grad_norm"] = [self.grad_norms.get(i, 0.0) for i in layers]
        out["update_ratio"] = [ratios.get(i, 0.0) for i in layers]
        out["embed_grad_norm"] = self.grad_norms.get("embed", 0.0)
        out["embed_update_ratio"] = ratios.get("embed", 0.0)
        if amp.low_dtype() is not None:
            counts = amp.cast_counts(reset=True)
            out["cast_values"], out["overflow"], out["underflow"] = (
                counts["values"], counts["overflow"], counts["underflow"])
        self.sums, self.before = [], None
        return out
