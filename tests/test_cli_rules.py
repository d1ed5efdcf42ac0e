"""The command-line rules: bad input is one line on stderr and exit code 2 with nothing
written; an internal error is one line and a traceback file, exit code 1; a diverged run
stops on its last good checkpoint; run folders are never replaced by accident."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyllm import train as train_mod
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main as cli_main

TINY = ["-m", "n_layers=1", "-m", "d_model=32", "-m", "n_heads=2", "-m", "context_length=96"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a tiny pretraining run and a tiny fine-tuning run, made once."""
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "1", "+", "2"]
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=300)) + ".\n")
    w = {"tmp": tmp, "corpus": corpus, "cache": tmp / "cache", "run": tmp / "run",
         "sft": tmp / "sft"}
    assert cli_main(train_args(w, w["run"], "--steps", "4", "--eval-every", "2")) == 0
    assert cli_main(["sft", "--from", str(w["run"]), "-o", str(w["sft"]), "--n-train", "60",
                     "--n-val", "4", "--steps", "2", "--batch-size", "2", "--eval-every", "2",
                     "--eval-iters", "1", "-q"]) == 0
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    w["bad_jsonl"] = bad
    good = tmp / "good.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    w["good_jsonl"] = good
    w["one_jsonl"] = tmp / "one.jsonl"
    w["one_jsonl"].write_text('{"prompt": "a", "completion": "b"}\n')
    w["empty_dir"] = tmp / "empty"
    w["empty_dir"].mkdir()
    w["binary"] = tmp / "binary.txt"
    w["binary"].write_bytes(bytes(range(256)) * 4)
    for name, text in {"float_steps": "steps = 3.7\n", "unknown_key": "stepz = 3\n",
                       "not_toml": "steps = = 3\n[model\n", "sft_unknown": "lora_rnk = 2\n"}.items():
        (tmp / f"{name}.toml").write_text(text)
        w[name] = tmp / f"{name}.toml"
    return w


def train_args(w, out, *extra):
    """A tiny, fast training command (character level, 1 layer); `extra` flags come last and
    override these."""
    return ["train", "--data", str(w["corpus"]), "--char", *TINY, "--block-size", "16", "--batch-size", "2",
            "--eval-iters", "1", "--log-every", "1", "--warmup", "1", "--sample-tokens", "0",
            "--cache-dir", str(w["cache"]), "-q", "-o", str(out), *extra]


def sft_args(w, out, *extra):
    return ["sft", "--from", str(w["run"]), "-o", str(out), "--n-train", "60", "--n-val", "4",
            "--batch-size", "2", "--eval-iters", "1", "-q", *extra]


def folder_hashes(*folders):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(out, err):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert "Traceback" not in out + err
    return lines[0]


# ---- bad input: exit 2, one line, nothing written ------------------------------------------------

# (id, argv from the fixture's paths and a fresh folder NEW, what the line must name)
BAD_INPUT = [
    ("train-steps-negative", lambda w, new: train_args(w, new, "--steps", "-5"), "steps"),
    ("train-steps-zero", lambda w, new: train_args(w, new, "--steps", "0"), "steps"),
    ("train-steps-text", lambda w, new: train_args(w, new, "--steps", "ten"), "steps"),
    ("train-lr-negative", lambda w, new: train_args(w, new, "--steps", "2", "--lr", "-1"), "lr"),
    ("train-lr-nan", lambda w, new: train_args(w, new, "--steps", "2", "--lr", "nan"), "lr"),
    ("train-clip-negative", lambda w, new: train_args(w, new, "--steps", "2", "--clip", "-1"),
     "clip"),
    ("train-log-every-zero", lambda w, new: train_args(w, new, "--steps", "2", "--log-every", "0"),
     "log_every"),
    ("train-eval-every-zero",
     lambda w, new: train_args(w, new, "--steps", "2", "--eval-every", "0"), "eval_every"),
    ("train-grad-accum-zero",
     lambda w, new: train_args(w, new, "--steps", "2", "--grad-accum", "0"), "grad_accum"),
    ("train-eval-iters-zero",
     lambda w, new: train_args(w, new, "--steps", "2", "--eval-iters", "0"), "eval_iters"),
    ("train-batch-size-zero",
     lambda w, new: train_args(w, new, "--steps", "2", "--batch-size", "0"), "batch_size"),
    ("train-warmup-negative", lambda w, new: train_args(w, new, "--steps", "2", "--warmup", "-1"),
     "warmup"),
    ("train-dtype", lambda w, new: train_args(w, new, "--steps", "2", "--dtype", "float8"),
     "float8"),
    ("train-device", lambda w, new: train_args(w, new, "--steps", "2", "--device", "tpu"), "tpu"),
    ("train-preset", lambda w, new: train_args(w, new, "--steps", "2", "--preset", "nope"), "nope"),
    ("train-data-missing",
     lambda w, new: train_args(w, new, "--steps", "2", "--data", "/no/such/file"), "/no/such/file"),
    ("train-tokenizer-missing",
     lambda w, new: train_args(w, new, "--steps", "2", "--tokenizer", "/no/such/tok.json"),
     "/no/such/tok.json"),
    ("train-data-empty-folder",
     lambda w, new: train_args(w, new, "--steps", "2", "--data", w["empty_dir"]), "empty"),
    ("train-data-not-utf8",
     lambda w, new: train_args(w, new, "--steps", "2", "--data", w["binary"]), "not UTF-8"),
    ("train-tokenizer-not-a-tokenizer",
     lambda w, new: train_args(w, new, "--steps", "2", "--tokenizer", w["binary"]), "binary.txt"),
    ("train-vocab-size-small",
     lambda w, new: train_args(w, new, "--steps", "2", "--vocab-size", "10"), "vocab_size"),
    ("train-beta1-one", lambda w, new: train_args(w, new, "--steps", "2", "--beta1", "1"), "beta1"),
    ("train-model-heads", lambda w, new: train_args(w, new, "--steps", "2", "-m", "n_heads=3"),
     "n_heads"),
    ("train-model-key", lambda w, new: train_args(w, new, "--steps", "2", "-m", "n_layerz=2"),
     "n_layerz"),
    ("train-model-no-equals", lambda w, new: train_args(w, new, "--steps", "2", "-m", "n_layers"),
     "n_layers"),
    ("train-block-size-too-long",
     lambda w, new: train_args(w, new, "--steps", "2", "--block-size", "97"), "block_size"),
    ("train-config-float-steps",
     lambda w, new: train_args(w, new, "--config", w["float_steps"]), "3.7"),
    ("train-config-unknown-key",
     lambda w, new: train_args(w, new, "--config", w["unknown_key"]), "stepz"),
    ("train-config-not-toml", lambda w, new: train_args(w, new, "--config", w["not_toml"]),
     "not_toml.toml"),
    ("train-config-missing",
     lambda w, new: train_args(w, new, "--config", "/no/such/c.toml"), "/no/such/c.toml"),
    ("train-resume-missing",
     lambda w, new: train_args(w, new, "--steps", "2", "--resume", "/no/such/dir"),
     "/no/such/dir"),
    ("train-resume-other-lr", lambda w, new: ["train", "--resume", w["run"], "--lr", "0.5", "-q"],
     "lr"),
    ("train-resume-steps-negative",
     lambda w, new: ["train", "--resume", w["run"], "--steps", "-5", "-q"], "steps"),
    ("train-resume-eval-every-zero",
     lambda w, new: ["train", "--resume", w["run"], "--steps", "6", "--eval-every", "0", "-q"],
     "eval_every"),
    ("train-resume-sft-run", lambda w, new: ["train", "--resume", w["sft"], "-q"],
     "resume it with tinyllm sft"),
    ("train-into-existing-run", lambda w, new: train_args(w, w["run"], "--steps", "2"),
     "already holds a run"),
    ("train-overwrite-bad-data",
     lambda w, new: train_args(w, w["run"], "--steps", "2", "--overwrite", "--data",
                               "/no/such/file"), "/no/such/file"),
    ("train-init-from-missing",
     lambda w, new: train_args(w, new, "--steps", "2", "--init-from", "/no/such"), "/no/such"),
    ("sft-from-missing", lambda w, new: ["sft", "--from", "/no/such", "-o", new, "-q"], "/no/such"),
    ("sft-no-from", lambda w, new: ["sft", "-o", new, "-q"], "--from"),
    ("sft-bad-data", lambda w, new: sft_args(w, new, "--data", w["bad_jsonl"]), "bad.jsonl:3"),
    ("sft-data-missing", lambda w, new: sft_args(w, new, "--data", "/no/such.jsonl"),
     "/no/such.jsonl"),
    ("sft-lora-rank-negative", lambda w, new: sft_args(w, new, "--lora-rank", "-1"), "lora-rank"),
    ("sft-lora-target-unknown",
     lambda w, new: sft_args(w, new, "--steps", "2", "--lora-rank", "2", "--lora-targets",
                             "wq,nope"), "nope"),
    ("sft-from-not-a-run", lambda w, new: sft_args(w, new, "--steps", "2", "--from", w["corpus"]),
     "corpus"),
    ("sft-val-fraction-one",
     lambda w, new: sft_args(w, new, "--steps", "2", "--data", w["good_jsonl"], "--val-fraction",
                             "1"), "val_fraction"),
    ("sft-tokenizer-missing",
     lambda w, new: sft_args(w, new, "--steps", "2", "--tokenizer", "/no/tok.json"),
     "/no/tok.json"),
    ("sft-data-one-conversation",
     lambda w, new: sft_args(w, new, "--steps", "2", "--data", w["one_jsonl"]), "one.jsonl"),
    ("sft-resume-other-data",
     lambda w, new: ["sft", "--resume", w["sft"], "--data", w["good_jsonl"], "-q"],
     "cannot resume with other settings"),
    ("sft-steps-zero", lambda w, new: sft_args(w, new, "--steps", "0"), "steps"),
    ("sft-lr-negative", lambda w, new: sft_args(w, new, "--lr", "-1"), "lr"),
    ("sft-dtype", lambda w, new: sft_args(w, new, "--steps", "2", "--dtype", "float8"), "float8"),
    ("sft-device", lambda w, new: sft_args(w, new, "--steps", "2", "--device", "tpu"), "tpu"),
    ("sft-config-unknown-key",
     lambda w, new: sft_args(w, new, "--steps", "2", "--config", w["sft_unknown"]), "lora_rnk"),
    ("sft-into-existing-run", lambda w, new: sft_args(w, w["sft"], "--steps", "2"),
     "already holds a run"),
    ("sft-into-pretraining-run", lambda w, new: sft_args(w, w["run"], "--steps", "2"),
     "holds the model to start from"),
    ("sft-resume-missing", lambda w, new: ["sft", "--resume", "/no/such/dir", "-q"],
     "/no/such/dir"),
    ("sft-resume-pretraining-run", lambda w, new: ["sft", "--resume", w["run"], "-q"],
     "not a sft run"),
    ("sft-resume-other-lr", lambda w, new: ["sft", "--resume", w["sft"], "--lr", "0.5", "-q"],
     "lr"),
    ("generate-temperature", lambda w, new: ["generate", w["run"], "--temperature", "-1",
                                             "--max-new-tokens", "3"], "temperature"),
    ("generate-top-p", lambda w, new: ["generate", w["run"], "--top-p", "2"], "top_p"),
    ("generate-device", lambda w, new: ["generate", w["run"], "--device", "tpu"], "tpu"),
    ("generate-missing", lambda w, new: ["generate", "/no/such"], "/no/such"),
    ("plot-missing", lambda w, new: ["plot", "/no/such"], "tinyllm plot"),
    ("merge-lora-missing", lambda w, new: ["merge-lora", "/no/such", "-o", new], "/no/such"),
    ("unknown-command", lambda w, new: ["trian"], "trian"),
    ("unknown-flag", lambda w, new: train_args(w, new, "--stepz", "3"), "--stepz"),
]


@pytest.mark.parametrize("make_argv, names", [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(world, tmp_path, capsys, monkeypatch, make_argv, names):
    monkeypatch.chdir(tmp_path)  # a default output folder would land here
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache-env"))
    new = tmp_path / "new"
    before = folder_hashes(world["run"], world["sft"])
    rc, out, err = run_cli(make_argv(world, new), capsys)
    line = assert_one_line(out, err)
    assert rc == 2, line
    assert names in line or names.replace("_", "-") in line, line  # config key or its flag
    assert folder_hashes(world["run"], world["sft"]) == before
    assert not new.exists()
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_plot_names_a_missing_run_folder(capsys):
    rc, out, err = run_cli(["plot", "/no/such/run"], capsys)
    assert rc == 2 and "/no/such/run" in assert_one_line(out, err)


def test_real_process_exit_code_and_stderr(tmp_path):
    env = dict(os.environ, TINYLLM_CACHE=str(tmp_path / "cache"))
    env.pop("TINYLLM_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "tinyllm", "train", "--steps", "-5"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [p.stderr.strip()] and "steps" in p.stderr, p.stderr
    assert "-5" in p.stderr and "Traceback" not in p.stdout + p.stderr
    assert list(tmp_path.iterdir()) == []


# ---- run folders ---------------------------------------------------------------------------------

def metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def test_overwrite_replaces_the_old_run(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(train_args(world, out, "--steps", "4", "--eval-every", "2")) == 0
    (out / "loss.png").write_bytes(b"an old plot")
    (out / "notes.txt").write_text("mine")
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [2, 4]
    rc, o, err = run_cli(train_args(world, out, "--steps", "3", "--eval-every", "3", "--overwrite",
                                    "--seed", "5"), capsys)
    assert rc == 0, err
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [3]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]
    assert not (out / "loss.png").exists()  # the old run's plot went with it
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: left alone
    for name in ("last.ckpt", "best.ckpt"):
        meta, _ = load_checkpoint(out / name)
        assert meta["step"] == 3 and meta["train_config"]["seed"] == 5
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 3


def test_sft_overwrite_replaces_a_lora_run(world, tmp_path, capsys):
    out = tmp_path / "lora"
    assert cli_main(sft_args(world, out, "--steps", "2", "--eval-every", "2",
                             "--lora-rank", "2")) == 0
    assert (out / "adapter.safetensors").exists()
    rc, o, err = run_cli(sft_args(world, out, "--steps", "2", "--eval-every", "2",
                                  "--overwrite"), capsys)
    assert rc == 0, err
    assert not (out / "adapter.safetensors").exists()
    meta, _ = load_checkpoint(out / "best.ckpt")
    assert "lora" not in meta and meta["train_config"]["lora_rank"] == 0


def test_failed_start_leaves_no_folder(world, tmp_path, capsys):
    new = tmp_path / "deep" / "new"
    rc, out, err = run_cli(train_args(world, new, "--steps", "2", "--data", "/no/such/file"),
                           capsys)
    assert rc == 2 and not (tmp_path / "deep").exists()
    rc, out, err = run_cli(sft_args(world, new, "--steps", "2", "--data", world["bad_jsonl"]),
                           capsys)
    assert rc == 2 and not (tmp_path / "deep").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    rc, out, err = run_cli(sft_args(world, new, "--steps", "2", "--data", empty), capsys)
    assert rc == 2 and "empty.jsonl" in assert_one_line(out, err)
    assert not (tmp_path / "deep").exists()


def test_stale_temporary_files_are_removed_on_resume(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(train_args(world, out, "--steps", "2", "--eval-every", "2")) == 0
    stale = [out / ".last.ckpt.k2j9x1.tmp", out / ".best.ckpt.abcd.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp"  # not a temporary of ours: not hidden
    keep.write_text("mine")
    rc, o, err = run_cli(["train", "--resume", out, "--steps", "3", "-q"], capsys)
    assert rc == 0, err
    assert not any(p.exists() for p in stale) and keep.exists()
    assert load_checkpoint(out / "last.ckpt")[0]["step"] == 3


# ---- internal errors -------------------------------------------------------------------------------

def boom(*args, **kwargs):
    raise RuntimeError("simulated bug deep inside")


def test_internal_error_is_one_line_and_a_traceback_file(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYLLM_DEBUG", raising=False)
    monkeypatch.setattr(train_mod, "accumulate_grads", boom)
    rc, out, err = run_cli(train_args(world, tmp_path / "run", "--steps", "2"), capsys)
    line = assert_one_line(out, err)
    assert rc == 1
    assert "internal error" in line and "RuntimeError" in line and "simulated bug" in line
    path = Path(line.split("traceback in ")[1].strip())
    assert path.is_file() and path.is_relative_to(tmp_path / "cache")
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "in boom" in text
    assert "RuntimeError: simulated bug deep inside" in text

    monkeypatch.setenv("TINYLLM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="simulated bug"):
        cli_main(train_args(world, tmp_path / "run2", "--steps", "2"))


def test_internal_error_report_falls_back_to_the_temporary_folder(world, tmp_path, capsys,
                                                                   monkeypatch):
    import tempfile

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("TINYLLM_CACHE", str(blocker))
    monkeypatch.delenv("TINYLLM_DEBUG", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))

    def two_lines(*args, **kwargs):
        raise TypeError("first line\nsecond line")

    monkeypatch.setattr(train_mod, "accumulate_grads", two_lines)
    rc, out, err = run_cli(train_args(world, tmp_path / "run", "--steps", "2"), capsys)
    line = assert_one_line(out, err)
    assert rc == 1 and "TypeError" in line and "first line second line" in line
    path = Path(line.split("traceback in ")[1].strip())
    assert path.parent == tmp_path / "tmpdir" and "in two_lines" in path.read_text()


def test_internal_error_in_sft(world, tmp_path, capsys, monkeypatch):
    from tinyllm import sft

    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYLLM_DEBUG", raising=False)
    monkeypatch.setattr(sft, "pad_batch", boom)
    rc, out, err = run_cli(sft_args(world, tmp_path / "sft", "--steps", "2"), capsys)
    line = assert_one_line(out, err)
    assert rc == 1 and "internal error" in line
    assert Path(line.split("traceback in ")[1].strip()).is_file()


def test_ctrl_c_outside_training_exits_130(world, capsys, monkeypatch):
    from tinyllm import generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "load_for_generation", interrupted)
    rc, out, err = run_cli(["generate", world["run"]], capsys)
    assert rc == 130 and assert_one_line(out, err) == "interrupted"


# ---- divergence --------------------------------------------------------------------------------------

def nan_from_call(n, monkeypatch, module=train_mod):
    """Make the training loss NaN from the n-th step on (counted from 1)."""
    real = module.accumulate_grads
    calls = {"n": 0}

    def accumulate(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return float("nan") if calls["n"] >= n else loss

    monkeypatch.setattr(module, "accumulate_grads", accumulate)


def test_divergence_stops_on_the_last_good_checkpoint(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_from_call(4, monkeypatch)  # steps 1-3 fine (a checkpoint at 2), NaN at step 4
    rc, o, err = run_cli(train_args(world, out, "--steps", "6", "--eval-every", "2"), capsys)
    line = assert_one_line(o, err)
    assert rc == 1
    assert "step 4" in line and "nan" in line.lower()  # the 4th step, as its log line counts
    assert str(out / "last.ckpt") in line
    meta, arrays = load_checkpoint(out / "last.ckpt")
    assert meta["step"] == 2 and all(np.isfinite(a).all() for a in arrays.values())
    assert load_checkpoint(out / "best.ckpt")[0]["step"] == 2
    from tinyllm.generate import load_for_generation

    load_for_generation(out)  # the good checkpoint loads


def test_divergence_before_any_checkpoint(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_from_call(1, monkeypatch)
    rc, o, err = run_cli(train_args(world, out, "--steps", "4", "--eval-every", "2"), capsys)
    line = assert_one_line(o, err)
    assert rc == 1 and "step 1" in line and "none" in line
    assert not (out / "last.ckpt").exists()


def huge_lr_run(world, out, capsys):
    return run_cli(train_args(world, out, "--steps", "8", "--eval-every", "1", "--lr", "1e6",
                              "--clip", "0", "--warmup", "0"), capsys)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow that makes it diverge
def test_huge_learning_rate_stops_with_one_line(world, tmp_path, capsys):
    rc, o, err = huge_lr_run(world, tmp_path / "run", capsys)
    line = assert_one_line(o, err)
    assert rc == 1 and "stopped" in line and "nan" in line.lower()
    assert re.search(r"at step \d+", line) and str(tmp_path / "run" / "last.ckpt") in line
    load_checkpoint(tmp_path / "run" / "last.ckpt")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_learning_rate_keeps_the_last_good_checkpoint_finite(world, tmp_path, capsys):
    rc, o, err = huge_lr_run(world, tmp_path / "run", capsys)
    assert rc == 1
    meta, arrays = load_checkpoint(tmp_path / "run" / "last.ckpt")
    bad = sorted(k for k, a in arrays.items() if k.startswith("model/") and not np.isfinite(a).all())
    assert not bad, f"step {meta['step']}: non-finite {bad}"
    vals = [r["val_loss"] for r in metrics(tmp_path / "run") if "val_loss" in r]
    assert all(np.isfinite(vals)), vals


def test_sft_divergence_exits_1(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sft"
    nan_from_call(3, monkeypatch)
    rc, o, err = run_cli(sft_args(world, out, "--steps", "4", "--eval-every", "2"), capsys)
    line = assert_one_line(o, err)
    assert rc == 1 and "step 3" in line and str(out / "last.ckpt") in line
    assert load_checkpoint(out / "last.ckpt")[0]["step"] == 2


# ---- dtype warning, init-from -----------------------------------------------------------------------

def test_bfloat16_on_cpu_warns_that_it_is_emulated(world, tmp_path, capsys):
    from autograd import amp

    args = [a for a in train_args(world, tmp_path / "run", "--steps", "1", "--eval-every", "1",
                                  "--dtype", "bfloat16") if a != "-q"]
    try:
        rc, out, err = run_cli(args, capsys)
    finally:
        amp.set_precision("float32")
    assert rc == 0
    line = assert_one_line(out, err)
    assert "bfloat16" in line and "emulated" in line and "slow" in line


def test_init_from_starts_a_new_run_from_trained_weights(world, tmp_path, capsys, monkeypatch):
    start = {}
    real_fit = train_mod.Run.fit

    def fit(self):
        start["step"] = self.step
        start["weights"] = {k: np.array(v) for k, v in self.model.state_dict().items()}
        start["tokenizer"] = self.tokenizer.to_json()
        return real_fit(self)

    monkeypatch.setattr(train_mod.Run, "fit", fit)
    out = tmp_path / "continued"
    rc, o, err = run_cli(["train", "--init-from", world["run"], "--data", world["corpus"],
                          "--steps", "2", "--eval-every", "2", "--eval-iters", "1",
                          "--batch-size", "2", "--sample-tokens", "0",
                          "--cache-dir", world["cache"], "-q", "-o", out], capsys)
    assert rc == 0, err
    assert start["step"] == 0
    source_meta, source_arrays = load_checkpoint(world["run"] / "best.ckpt")
    source = {k[len("model/"):]: v for k, v in source_arrays.items() if k.startswith("model/")}
    assert start["weights"].keys() == source.keys()
    for k, v in source.items():
        assert np.array_equal(start["weights"][k], v), k
    assert start["tokenizer"] == source_meta["tokenizer"]
    assert (out / "tokenizer.json").read_bytes() == (world["run"] / "tokenizer.json").read_bytes()
    meta, _ = load_checkpoint(out / "last.ckpt")
    assert meta["step"] == 2 and [r["step"] for r in metrics(out) if "val_loss" in r] == [2]
    assert meta["model_config"] == source_meta["model_config"]


def test_init_from_refuses_model_overrides_it_cannot_apply(world, tmp_path, capsys):
    out = tmp_path / "continued"
    rc, o, err = run_cli(["train", "--init-from", world["run"], "--data", world["corpus"],
                          "-m", "d_model=64", "--steps", "2", "--eval-every", "2",
                          "--eval-iters", "1", "--batch-size", "2", "--block-size", "16",
                          "--sample-tokens", "0", "--cache-dir", world["cache"], "-q", "-o", out],
                         capsys)
    assert rc == 2 and "d_model" in assert_one_line(o, err)
    assert not out.exists()


def test_sft_refuses_to_overwrite_the_run_it_starts_from(world, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(world["run"], base)
    before = folder_hashes(base)
    rc, o, err = run_cli(["sft", "--from", base, "-o", base, "--overwrite", "--n-train", "60",
                          "--n-val", "4", "--batch-size", "2", "--eval-iters", "1", "--steps", "2",
                          "-q"], capsys)
    assert rc == 2 and str(base) in assert_one_line(o, err)
    assert folder_hashes(base) == before
