"""Training runs end to end: exact resume, checkpoint integrity, config layering, the CLI."""

import json
import re

import numpy as np
import pytest

from tinyllm import checkpoint
from tinyllm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinyllm.cli import main as cli_main
from tinyllm.train import TrainConfig, train

TINY = dict(n_layers=1, d_model=32, n_heads=2, context_length=16)


def config(tmp_path, corpus, **kw):
    base = dict(data=str(corpus), char=True, model=dict(TINY), steps=6, batch_size=2,
                block_size=16, warmup=2, lr=3e-3, eval_every=3, eval_iters=2, log_every=2,
                sample_tokens=0, quiet=True, out=str(tmp_path / "run"),
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return TrainConfig(**base)


def weights(run):
    return {k: np.array(v) for k, v in run.model.state_dict().items()}


def test_resume_is_bit_identical(tmp_path, corpus):
    full, _ = train(config(tmp_path / "a", corpus, steps=6))
    part, s = train(config(tmp_path / "b", corpus, steps=3))
    assert s["step"] == 3
    resumed, s = train(config(tmp_path / "b", corpus, steps=6), resume=tmp_path / "b" / "run")
    assert s["step"] == 6
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # optimizer moments too
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for name in sa[i]:
            assert np.array_equal(sa[i][name], sb[i][name])
    # metrics: one validation record per evaluation, none duplicated by the resume
    lines = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == [3, 6]


def test_training_lowers_the_loss(tmp_path, corpus):
    run, s = train(config(tmp_path, corpus, steps=40, eval_every=40, lr=1e-2, warmup=5))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = lines[0]["loss"]
    assert s["best_val"] < first - 1.0  # from ~ln(257) = 5.5 towards the corpus's entropy
    assert (tmp_path / "run" / "best.ckpt").exists() and (tmp_path / "run" / "last.ckpt").exists()


def test_checkpoint_round_trip_and_corruption(tmp_path):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.array([1, 2], np.int64)}
    path = save_checkpoint(tmp_path / "c.ckpt", {"step": 5}, arrays)
    meta, back = load_checkpoint(path)
    assert meta == {"step": 5}
    for k in arrays:
        assert np.array_equal(arrays[k], back[k]) and arrays[k].dtype == back[k].dtype
    raw = path.read_bytes()
    # flip one byte in the array data
    bad = bytearray(raw)
    bad[-40] ^= 0xFF
    (tmp_path / "flip.ckpt").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match=r"flip\.ckpt: checksum mismatch"):
        load_checkpoint(tmp_path / "flip.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: .*(truncated|checksum)"):
        load_checkpoint(tmp_path / "cut.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"hello")
    with pytest.raises(CheckpointError, match=r"junk\.ckpt: not a tinyllm checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="missing.ckpt: cannot read"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.ckpt", {"step": 1}, {"w": np.zeros(1000, np.float32)})
    before = path.read_bytes()
    calls = {"n": 0}
    real = checkpoint._write_chunk

    def failing(f, data, h):
        calls["n"] += 1
        if calls["n"] == 3:  # header written, the arrays half-way
            raise OSError("disk full (simulated)")
        real(f, data, h)

    monkeypatch.setattr(checkpoint, "_write_chunk", failing)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"step": 2}, {"w": np.ones(1000, np.float32),
                                            "v": np.ones(10, np.float32)})
    assert path.read_bytes() == before
    assert load_checkpoint(path)[0] == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_resume_refuses_other_model_or_tokenizer(tmp_path, corpus, capsys):
    train(config(tmp_path, corpus, steps=3))
    run_dir = tmp_path / "run"
    other = config(tmp_path, corpus, steps=6, model=dict(TINY, d_model=64))
    with pytest.raises(CheckpointError, match=r"last\.ckpt: model config does not match: .*d_model: checkpoint has 32, expected 64"):
        train(other, resume=run_dir)
    from tinyllm.tokenizer import Tokenizer

    tok = Tokenizer.train("the cat sat on the mat " * 50, 270)
    tok.save(tmp_path / "tok.json")
    other = config(tmp_path, corpus, steps=6, char=False, tokenizer=str(tmp_path / "tok.json"))
    # resuming always uses the checkpoint's own tokenizer; a CLI asking for another is refused
    assert cli_main(["train", "--resume", str(run_dir), "--tokenizer", str(tmp_path / "tok.json"),
                     "-q"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"last\.ckpt: cannot resume with other settings: .*tokenizer", err), err
    with pytest.raises(CheckpointError, match=r"last\.ckpt: tokenizer does not match: .*tok\.json"):
        train(other, resume=run_dir)
    # loading weights into a model of another vocabulary names the file and the mismatch
    from tinyllm.train import Run

    meta, arrays = load_checkpoint(run_dir / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"last\.ckpt: (model config|tokenizer) does not match"):
        Run(other, resume_from={"path": run_dir / "last.ckpt", "meta": meta, "arrays": arrays})


def test_config_file_and_cli_overrides(tmp_path, corpus, capsys):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'data = "{corpus}"\nchar = true\nsteps = 2\nbatch_size = 2\n'
                        f'block_size = 16\neval_every = 2\neval_iters = 1\nsample_tokens = 5\n'
                        f'[model]\nn_layers = 1\nd_model = 32\nn_heads = 2\ncontext_length = 16\n')
    out = tmp_path / "cli-run"
    rc = cli_main(["train", "--config", str(cfg_file), "--steps", "3", "-m", "d_model=16",
                   "-o", str(out), "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["steps"] == 3 and saved["model"]["d_model"] == 16
    assert saved["model"]["n_layers"] == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    assert cli_main(["train", "--config", str(bad)]) == 2
    assert "unknown training settings ['stepz']" in capsys.readouterr().err


def test_plot_writes_png_or_explains_missing_matplotlib(tmp_path, corpus):
    train(config(tmp_path, corpus, steps=4, eval_every=2))
    from tinyllm.plot import plot_run, read_metrics

    tr, val = read_metrics(tmp_path / "run")
    assert [r["step"] for r in tr] == [2, 4] and [r["step"] for r in val] == [2, 4]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs matplotlib: pip install"):
            plot_run(tmp_path / "run")
        return
    out = plot_run(tmp_path / "run")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_run(tmp_path)
    assert cli_main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()


def test_gradient_accumulation_equals_one_big_batch(tmp_path, corpus):
    from tinyllm.train import Run, build_model

    cfg = config(tmp_path, corpus, grad_accum=2, batch_size=2, clip=0.0)
    run = Run(cfg)
    w0 = {k: v.copy() for k, v in run.model.state_dict().items()}
    grads = {}
    real_step = run.optimizer.step

    def spy():
        grads.update({n: p.grad.copy() for n, p in run.model.named_parameters()})
        real_step()

    run.optimizer.step = spy
    run.train_step()  # micro-batches 0 and 1, each loss scaled by 1/2
    ref = build_model(cfg, run.tokenizer.vocab_size)
    ref.load_state_dict(w0)
    (x0, y0), (x1, y1) = run.batches.get(0), run.batches.get(1)
    _, loss = ref(np.concatenate([x0, x1]), np.concatenate([y0, y1]))
    loss.backward()
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
def test_mixed_precision_training_keeps_float32_weights_and_learns(tmp_path, corpus, mode):
    from autograd import amp

    try:
        run, s = train(config(tmp_path, corpus, steps=30, eval_every=30, lr=1e-2, warmup=5, dtype=mode))
    finally:
        amp.set_precision("float32")
    assert all(p.dtype == np.float32 for p in run.model.parameters())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert s["best_val"] < lines[0]["loss"] - 1.0
    assert (run.scaler is not None) == (mode == "float16")


def test_unknown_dtype_is_refused(tmp_path, corpus):
    with pytest.raises(ValueError, match="dtype must be one of"):
        train(config(tmp_path, corpus, dtype="int8"))


def test_checkpoint_blocks_trains_like_the_plain_model(tmp_path, corpus):
    # activation checkpointing changes memory, not the training: the same weights after a few
    # steps (up to the order of float32 sums), with dropout replayed, and the split batch too
    model = dict(TINY, dropout=0.1)
    plain, _ = train(config(tmp_path / "a", corpus, model=model, data_threads=1))
    ck, _ = train(config(tmp_path / "b", corpus, model=model, data_threads=1, checkpoint_blocks=True))
    assert ck.model.checkpoint_blocks and not plain.model.checkpoint_blocks
    a, b = weights(plain), weights(ck)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    split, _ = train(config(tmp_path / "c", corpus, data_threads=2, checkpoint_blocks=True))
    unsplit, _ = train(config(tmp_path / "d", corpus, data_threads=2))
    for k, v in weights(unsplit).items():
        np.testing.assert_allclose(weights(split)[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_design_flags_reach_the_model_the_checkpoint_and_generation(tmp_path, corpus, capsys):
    out = tmp_path / "post"
    rc = cli_main(["train", "--data", str(corpus), "--char", "--steps", "3", "--batch-size", "2",
                   "--block-size", "16", "--eval-every", "3", "--eval-iters", "1",
                   "--sample-tokens", "0", "-m", "n_layers=1", "-m", "d_model=32",
                   "-m", "n_heads=2", "-m", "context_length=16", "--norm-position", "post",
                   "--positions", "sinusoidal", "--init", "normal", "-o", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert rc == 0
    meta, _ = load_checkpoint(out / "last.ckpt")
    got = {k: meta["model_config"][k] for k in ("norm_position", "positions", "init")}
    assert got == {"norm_position": "post", "positions": "sinusoidal", "init": "normal"}
    from tinyllm.generate import load_for_generation

    model, tok = load_for_generation(str(out))
    assert model.config.norm_position == "post" and model.norm_f is None
    assert model.pos_table is not None
    assert cli_main(["train", "--positions", "alibi", "-q"]) == 2
    assert "invalid choice: 'alibi'" in capsys.readouterr().err


def test_a_checkpoint_saved_before_the_design_settings_resumes(tmp_path, corpus):
    train(config(tmp_path, corpus, steps=3))
    path = tmp_path / "run" / "last.ckpt"
    meta, arrays = load_checkpoint(path)
    for key in ("norm_position", "init"):  # as written before these settings existed
        del meta["model_config"][key]
    save_checkpoint(path, meta, arrays)
    run, s = train(config(tmp_path, corpus, steps=6), resume=tmp_path / "run")
    assert s["step"] == 6 and run.model.config.norm_position == "pre"


def test_the_first_threaded_run_of_a_process_equals_the_next(tmp_path, corpus):
    # Slices of a batch on threads (data_threads 2) from the very first step of a fresh
    # process: both threads must find every fast path registered, or one of them runs a
    # reference op and the step differs in the last bits from the same step run later.
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import numpy as np
from tinyllm.train import TrainConfig, train
runs = []
for name in ("first", "second"):
    cfg = TrainConfig(data={str(corpus)!r}, char=True, steps=3, batch_size=4, block_size=16,
                      warmup=1, lr=3e-3, eval_every=3, eval_iters=1, sample_tokens=0, quiet=True,
                      data_threads=2, out={str(tmp_path)!r} + "/" + name,
                      cache_dir={str(tmp_path / "cache")!r},
                      model=dict(n_layers=2, d_model=32, n_heads=2, context_length=16))
    run, _ = train(cfg)
    assert run.shards == 2
    runs.append({{k: np.array(v) for k, v in run.model.state_dict().items()}})
bad = [k for k in runs[0] if not np.array_equal(runs[0][k], runs[1][k])]
print("differ:", bad)
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "differ: []" in out.stdout, out.stdout
