"""The training step as a CUDA graph (autograd/fast/cuda/graph.py, Run.graph_step).

A replayed step must train exactly as the uncaptured one: the same losses, weights, optimizer
state and generator state, with dropout drawn through the graph's seed slots. The kernels
that sum with atomics (norm weight gradients, the gradient norm) may add in another order from
one run to the next, so values are compared to float32 rounding rather than bit for bit. Adam
turns such a rounding difference in a gradient element near zero into a difference of a small
fraction of one step (lr 3e-3 here) in its weight: weights get WEIGHT_ATOL.
The CPU cases check when a run refuses or skips capture. The GPU cases run on a CUDA machine
(scripts/gpu-check.sh).
"""

import json

import numpy as np
import pytest

import autograd
from autograd import amp, backend, optim
from autograd.tensor import Tensor
from tinyllm.cli import UsageError
from tinyllm.model import GPT, ModelConfig
from tinyllm.train import train

from test_train import config as train_config

cuda = pytest.mark.skipif(not backend.cuda_available(), reason="CuPy with a CUDA GPU is not available")

def host(a):
    return backend.to_device(a, "cpu")


# lr / 300 in float32: a rounding difference amplified by Adam's 1/sqrt(v), not a wrong step (lr).
# In bfloat16, where the activations between the products are rounded to 8 bits too, two
# uncaptured runs of the same bfloat16 test differ by up to 5.5e-5 on an H200 (lr / 30 allows it).
WEIGHT_ATOL = {"float32": 1e-5, "bfloat16": 1e-4}

TINY = dict(n_layers=2, d_model=32, n_heads=2, context_length=16)


def config(tmp_path, corpus, **kw):
    """test_train's tiny run, two layers deep, 8 steps, each logged."""
    return train_config(tmp_path, corpus, **{**dict(model=dict(TINY), steps=8, batch_size=4,
                                                    eval_every=4, log_every=1), **kw})


def losses(tmp_path):
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [r["val_loss"] for r in lines if "val_loss" in r]


# ---- CPU: when capture is refused or skipped ------------------------------------------------------

def test_cuda_graph_on_is_refused_on_the_cpu_with_the_reason(tmp_path, corpus):
    with pytest.raises(UsageError, match="cuda_graph on: the step cannot be captured: CUDA graphs need a GPU"):
        train(config(tmp_path, corpus, cuda_graph="on"))


def test_cuda_graph_auto_on_the_cpu_trains_uncaptured(tmp_path, corpus):
    run, s = train(config(tmp_path, corpus, steps=2, cuda_graph="auto"))
    assert s["step"] == 2 and not run.use_graph and run.step_graph is None


def test_a_bad_cuda_graph_setting_names_the_choices(tmp_path, corpus):
    from tinyllm.train import validate_train

    with pytest.raises(UsageError, match="cuda_graph"):
        validate_train(config(tmp_path, corpus, cuda_graph="yes"))


# ---- GPU: the captured step against the uncaptured one --------------------------------------------

@cuda
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_captured_run_trains_like_an_uncaptured_one(tmp_path, corpus, dropout, dtype):
    model = dict(TINY, dropout=dropout)
    try:
        plain, _ = train(config(tmp_path / "a", corpus, model=model, device="cuda", dtype=dtype,
                                cuda_graph="off"))
        state_a = json.dumps(backend.rng("cpu").bit_generator.state, default=str)
        graphed, _ = train(config(tmp_path / "b", corpus, model=model, device="cuda", dtype=dtype,
                                  cuda_graph="on"))
        state_b = json.dumps(backend.rng("cpu").bit_generator.state, default=str)
    finally:
        amp.set_precision("float32")
    assert graphed.step_graph is not None and plain.step_graph is None
    (la, va), (lb, vb) = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == len(lb) == 8
    np.testing.assert_allclose(lb, la, rtol=2e-5)
    np.testing.assert_allclose(vb, va, rtol=2e-5)
    for (k, a), b in zip(plain.model.state_dict().items(), graphed.model.state_dict().values()):
        np.testing.assert_allclose(host(b), host(a), rtol=1e-4, atol=WEIGHT_ATOL[dtype], err_msg=k)
    assert plain.optimizer.step_count == graphed.optimizer.step_count == 8
    # the CPU generator drew the same seeds: its state is the same after each run
    assert state_a == state_b
    # the moments, relative to each one's largest value: bfloat16 rounds the products'
    # operands to 8 bits, where an atomic sum's last-bit difference can flip a rounding (0.4%),
    # and 8 steps of training carry such flips on (past 1e-3 of the largest value on an H200)
    tol = 1e-4 if dtype == "float32" else 1e-2
    sa = plain.optimizer.state_dict()["state"]
    sb = graphed.optimizer.state_dict()["state"]
    for i in sa:
        for name in sa[i]:
            a, b = host(sa[i][name]), host(sb[i][name])
            err = np.abs(b - a).max() / np.abs(a).max()
            assert err <= tol, (i, name, err)


@cuda
def test_the_generator_state_after_a_captured_run_is_the_uncaptured_runs(tmp_path, corpus):
    model = dict(TINY, dropout=0.1)
    states = []
    for name, setting in (("a", "off"), ("b", "on")):
        train(config(tmp_path / name, corpus, model=model, device="cuda", steps=5, eval_every=5,
                     cuda_graph=setting))
        states.append(json.dumps(backend.rng("cpu").bit_generator.state, default=str))
    assert states[0] == states[1]


@cuda
def test_a_captured_run_resumes_like_an_uncaptured_one(tmp_path, corpus):
    # 4 steps, then resumed to 8, captured and uncaptured: after the resume the step is
    # captured again (from the checkpoint's optimizer state and generator) and goes on as the
    # uncaptured run does
    model = dict(TINY, dropout=0.1)
    runs = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        train(config(out, corpus, model=model, device="cuda", steps=4, cuda_graph=setting))
        runs[setting], _ = train(config(out, corpus, model=model, device="cuda", steps=8,
                                        cuda_graph=setting), resume=out / "run")
    assert runs["on"].step_graph is not None and runs["off"].step_graph is None
    (la, _), (lb, _) = losses(tmp_path / "off"), losses(tmp_path / "on")
    assert len(la) == len(lb) == 8
    np.testing.assert_allclose(lb, la, rtol=2e-5)
    for (k, a), b in zip(runs["off"].model.state_dict().items(),
                         runs["on"].model.state_dict().values()):
        np.testing.assert_allclose(host(b), host(a), rtol=1e-4, atol=WEIGHT_ATOL["float32"], err_msg=k)


def _model_and_step(dropout=0.0):
    cp = backend.cupy_module()
    autograd.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layers=1, d_model=32, n_heads=2, context_length=8,
                            dropout=dropout, device="cuda"))
    params = model.parameters()
    opt = optim.AdamW(params, lr=1e-2)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.integers(0, 50, (4, 8)))
    y = cp.asarray(rng.integers(0, 50, (4, 8)))

    def step(x, y):
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        norm_sq = optim.clip_grad_norm_on_device(params, 1.0)
        opt.step(norm_sq=norm_sq + loss.data * 0)
        opt.zero_grad()
        return loss.data, norm_sq

    return model, opt, step, x, y


@cuda
def test_a_non_finite_loss_leaves_weights_and_moments_untouched():
    from autograd.fast.cuda.graph import StepGraph

    model, opt, step, x, y = _model_and_step()
    step(x, y)  # an uncaptured step: the moments exist
    g = StepGraph(step, [x.copy(), y.copy()])
    g.capture()
    g.launch()
    p = model.parameters()[0]
    p.data[0, 0] = float("nan")  # the loss and every gradient become nan
    before = [q.data.copy() for q in model.parameters()]
    moments = {k: v.copy() for k, v in opt.state[id(p)].items()} if hasattr(opt, "state") else None
    loss, norm_sq = g.launch()
    assert not np.isfinite(float(loss)) and not np.isfinite(float(norm_sq[0]))
    for q, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(q.data.get(), b.get())
    if moments:
        for k, v in moments.items():
            np.testing.assert_array_equal(opt.state[id(p)][k].get(), v.get())


@cuda
def test_a_step_that_reads_on_the_host_is_refused_and_the_gpu_still_works():
    from autograd.fast.cuda.graph import CaptureError, StepGraph

    cp = backend.cupy_module()
    x = cp.arange(6, dtype=cp.float32)

    def step(x):
        return x * float((x * 2).sum())  # a host read of a value the graph has not computed

    g = StepGraph(step, [x])
    with pytest.raises(CaptureError):
        g.capture()
    assert float((x + 1).sum()) == 21.0


@cuda
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clipping_on_the_device_matches_clip_grad_norm(max_norm):
    cp = backend.cupy_module()
    rng = np.random.default_rng(1)
    shapes = [(5, 7), (70000,), (3,)]
    a = [Tensor(cp.zeros(s, np.float32), requires_grad=True) for s in shapes]
    b = [Tensor(cp.zeros(s, np.float32), requires_grad=True) for s in shapes]
    for s, p, q in zip(shapes, a, b):
        g = rng.standard_normal(s).astype(np.float32)
        p.grad, q.grad = cp.asarray(g), cp.asarray(g)
    norm = optim.clip_grad_norm(a, max_norm)
    norm_sq = optim.clip_grad_norm_on_device(b, max_norm)
    assert np.sqrt(float(norm_sq[0])) == pytest.approx(norm, rel=1e-5)
    for p, q in zip(a, b):
        np.testing.assert_allclose(q.grad.get(), p.grad.get(), rtol=1e-6)


@cuda
def test_a_captured_step_with_dropout_draws_new_masks_each_replay():
    from autograd.fast.cuda.graph import StepGraph

    model, opt, step, x, y = _model_and_step(dropout=0.5)
    opt.param_groups[0]["lr"] = opt.param_groups[-1]["lr"] = 0.0  # the weights stay: only masks change
    step(x, y)
    g = StepGraph(step, [x, y])
    g.capture()
    seen = {float(g.launch()[0]) for _ in range(4)}
    assert len(seen) == 4  # a seed baked into the graph would give one loss four times
