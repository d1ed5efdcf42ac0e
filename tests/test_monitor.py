"""The training-health monitor: its figures against the same figures computed by hand."""

import json

import numpy as np
import pytest

from autograd import Tensor, amp, no_grad
from autograd.testing import device_params
from tinyllm.cli import main as cli_main
from tinyllm.train import Run, TrainConfig, build_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    (folder / "doc.txt").write_text(" ".join(rng.choice(words, size=2000)) + ".\n")
    return folder


def config(tmp_path, corpus, **kw):
    base = dict(data=str(corpus), char=True, steps=4, batch_size=4, block_size=16, warmup=0,
                lr=1e-2, eval_every=100, eval_iters=1, log_every=2, sample_tokens=0,
                quiet=True, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                monitor=True, dtype="float64",
                model=dict(n_layers=3, d_model=16, n_heads=2, context_length=16))
    base.update(kw)
    return TrainConfig(**base)


def rms(a):
    return float(np.sqrt(np.mean(np.asarray(a, np.float64) ** 2)))


def by_hand(model, x, y):
    """The monitor's figures for one step on batch (x, y), from arrays: each block applied by
    hand, the gradients of a plain backward on the whole batch."""
    resid, attn, mlp = [], [], []
    cfg = model.config
    with no_grad():
        h = model.tok_emb(x)
        if model.pos_emb is not None:
            h = h + model.pos_emb.weight[:x.shape[1]]
        tables = model.rope.tables(0, x.shape[1], h.dtype) if model.rope is not None else None
        for b in model.blocks:
            if cfg.norm_position == "pre":
                a = b.attn(b.norm1(h), tables)
                h = h + a
                m = b.mlp(b.norm2(h))
                h = h + m
            else:
                a = b.attn(h, tables)
                h = b.norm1(h + a)
                m = b.mlp(h)
                h = b.norm2(h + m)
            attn.append(rms(a.data))
            mlp.append(rms(m.data))
            resid.append(rms(h.data))
    _, loss = model(x, y)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    norms = [np.sqrt(sum(np.sum(g ** 2) for n, g in grads.items() if n.startswith(f"blocks.{i}.")))
             for i in range(cfg.n_layers)]
    embed = np.sqrt(sum(np.sum(g ** 2) for n, g in grads.items()
                        if n.startswith(("tok_emb.", "pos_emb."))))
    return dict(resid_rms=resid, attn_rms=attn, mlp_rms=mlp, grad_norm=norms,
                embed_grad_norm=embed)


def update_ratios(w0, w1, n_layers):
    def ratio(prefix):
        names = [n for n in w0 if n.startswith(prefix)]
        d = sum(np.sum((w1[n] - w0[n]) ** 2) for n in names)
        return float(np.sqrt(d / sum(np.sum(w0[n] ** 2) for n in names)))
    return [ratio(f"blocks.{i}.") for i in range(n_layers)], ratio(("tok_emb.", "pos_emb."))


@pytest.mark.parametrize("options", [dict(data_threads=1),
                                     dict(data_threads=2),  # slices of the batch on threads
                                     dict(data_threads=1, grad_accum=2),
                                     dict(data_threads=1, model=dict(
                                         n_layers=2, d_model=16, n_heads=2, context_length=16,
                                         norm_position="post", flavour="gpt2"))])
def test_monitor_figures_equal_the_figures_computed_by_hand(tmp_path, corpus, options):
    cfg = config(tmp_path, corpus, **options)
    run = Run(cfg)
    w0 = {n: a.copy() for n, a in run.model.state_dict().items()}
    ref = build_model(cfg, run.tokenizer.vocab_size)
    ref.load_state_dict(w0)
    batches = [run.micro_batch(k) for k in range(cfg.grad_accum)]
    run.train_step()  # step 1: monitored (the first step always is)
    got = run.monitor_figures
    w1 = {n: np.array(a) for n, a in run.model.state_dict().items()}
    x, y = (np.concatenate(a) for a in zip(*batches))
    want = by_hand(ref, x, y)
    for key in ("resid_rms", "attn_rms", "mlp_rms", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, err_msg=key)
    assert got["embed_grad_norm"] == pytest.approx(want["embed_grad_norm"], rel=1e-9)
    ratios, embed_ratio = update_ratios(w0, w1, ref.config.n_layers)
    np.testing.assert_allclose(got["update_ratio"], ratios, rtol=1e-9)
    assert got["embed_update_ratio"] == pytest.approx(embed_ratio, rel=1e-9)
    assert 1e-4 < min(ratios) and max(ratios) < 1  # a real step was taken
    assert "overflow" not in got  # float64: no casts
    assert all(b.probe is None for b in run.model.blocks)  # probes off between steps
    run.train_step()  # step 2 is logged, step 3 is not: no figures for it
    assert run.monitor_figures is not None
    run.monitor_figures = None
    run.train_step()
    assert run.monitor_figures is None


@pytest.mark.parametrize("device", [p for p in device_params() if p.id == "cuda"])
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_monitor_on_a_device_agrees_with_the_cpu(tmp_path, corpus, device, dtype):
    # the same first step on the CPU and on the device: the same figures (float16: the same
    # products rounded the same way, summed in another order)
    figs = {}
    try:
        for where in ("cpu", device):
            run = Run(config(tmp_path / where, corpus, data_threads=1, device=where, dtype=dtype))
            run.train_step()
            figs[where] = run.monitor_figures
    finally:
        amp.set_precision("float32")
    rtol = 1e-9 if dtype == "float64" else 2e-2
    for key in ("resid_rms", "attn_rms", "mlp_rms", "grad_norm", "update_ratio"):
        np.testing.assert_allclose(figs[device][key], figs["cpu"][key], rtol=rtol, err_msg=key)
    if dtype == "float16":  # the GPU's fast paths cast a shared operand once for several
        # products (q, k, v read one low copy), so fewer values pass through the cast there
        assert 0 < figs[device]["cast_values"] <= figs["cpu"]["cast_values"]
        assert figs[device]["overflow"] == figs["cpu"]["overflow"]


def test_metrics_hold_the_figures_of_logged_steps_and_nothing_without_monitor(tmp_path, corpus):
    from tinyllm.train import train

    train(config(tmp_path / "on", corpus, steps=5))
    recs = [json.loads(line) for line in (tmp_path / "on" / "run" / "metrics.jsonl").open()]
    mon = [(r["step"], len(r["monitor"]["resid_rms"])) for r in recs if "monitor" in r]
    assert mon == [(1, 3), (2, 3), (4, 3), (5, 3)]
    train(config(tmp_path / "off", corpus, steps=5, monitor=False))
    recs = [json.loads(line) for line in (tmp_path / "off" / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 5]
    assert not any("monitor" in r for r in recs)


def test_float16_steps_count_cast_overflows_and_underflows(tmp_path, corpus):
    try:
        run = Run(config(tmp_path, corpus, dtype="float16", data_threads=1))
        run.train_step()
    finally:
        amp.set_precision("float32")
    fig = run.monitor_figures
    # every operand of every product was counted: the forward's and the backward's
    assert fig["cast_values"] > 0 and fig["overflow"] >= 0 and fig["underflow"] >= 0
    # the loss scale (2^16) was divided out of the gradient norms: they are a float32 step's
    ref = Run(config(tmp_path / "ref", corpus, dtype="float32", data_threads=1))
    ref.train_step()
    np.testing.assert_allclose(fig["grad_norm"], ref.monitor_figures["grad_norm"], rtol=0.05)
    assert not amp._counting  # counting stops with the step


def test_cast_counts_of_a_step_match_a_count_by_hand():
    # one float16 product whose operands hold known numbers of unrepresentable values
    a = Tensor(np.array([[1e-9, 1.0], [7e4, 2.0]], np.float32))
    b = Tensor(np.array([[1.0, 1e-12], [3.0, 4.0]], np.float32))
    amp.count_casts()
    amp.cast_counts(reset=True)
    try:
        with amp.autocast("float16"), no_grad(), np.errstate(all="ignore"):
            a @ b  # 7e4 is inf in float16
    finally:
        amp.count_casts(False)
    assert amp.cast_counts(reset=True) == {"values": 8, "overflow": 1, "underflow": 2}


def test_monitor_flag_on_the_command_line(tmp_path, corpus):
    out = tmp_path / "cli"
    assert cli_main(["train", "--data", str(corpus), "--char", "--steps", "2", "--batch-size", "2",
                     "--block-size", "8", "-m", "n_layers=2", "-m", "d_model=16", "-m", "n_heads=2",
                     "-m", "context_length=8", "--eval-every", "2", "--eval-iters", "1",
                     "--sample-tokens", "0", "--monitor", "-o", str(out), "--cache-dir",
                     str(tmp_path / "cache"), "-q"]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in recs if "monitor" in r] == [1, 2]
    assert json.loads((out / "config.json").read_text())["train"]["monitor"] is True


def test_plot_draws_the_monitor_figures(tmp_path, corpus):
    from tinyllm.plot import plot_monitor
    from tinyllm.train import train

    train(config(tmp_path / "off", corpus, steps=2, monitor=False))
    with pytest.raises(ValueError, match="no monitor figures"):
        plot_monitor(tmp_path / "off" / "run")
    train(config(tmp_path, corpus, steps=4))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs matplotlib"):
            plot_monitor(tmp_path / "run")
        return
    assert cli_main(["plot", "--monitor", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "monitor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
