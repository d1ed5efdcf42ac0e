"""Data-parallel training on two real GPUs through NCCL (skipped with fewer than two): the
collectives across processes, `tinyllm train --gpus 2` against one GPU, resuming on another
number of GPUs, and what happens when a worker dies or hangs. Run by scripts/gpu-multi.sh."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autograd import backend
from tinyllm.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def gpu_count():
    return backend.cupy_module().cuda.runtime.getDeviceCount() if backend.cuda_available() else 0


pytestmark = pytest.mark.skipif(gpu_count() < 2, reason="needs two CUDA GPUs")

FLOAT32 = dict(rtol=1e-4, atol=5e-5)  # float32 round-off after a few AdamW steps


@pytest.fixture(autouse=True)
def worker_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NNODES", "NODE_RANK", "MASTER_ADDR",
                 "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


COLLECTIVES = """
import json, os, sys, time
import cupy as cp, numpy as np
from autograd import distributed
from autograd.backend import bfloat16
cp.cuda.Device(int(os.environ["LOCAL_RANK"])).use()
mode, out = sys.argv[1], sys.argv[2]
group = distributed.NcclGroup.from_env(timeout=float(os.environ.get("TIMEOUT", 120)))
r, W = group.rank, group.world_size
res = {}
if mode == "hang":
    if r == 1:
        time.sleep(300)  # never joins: rank 0's watchdog must end it
    group.all_reduce(cp.ones(4, cp.float32))
    cp.cuda.Device().synchronize()
    sys.exit(0)
a = cp.arange(10, dtype=cp.float32) * (r + 1)
res["sum"] = group.all_reduce(a.copy()).get().tolist()
res["avg"] = group.all_reduce(a.copy(), op="avg").get().tolist()
res["sum64"] = group.all_reduce(cp.full(3, r + 0.5, cp.float64)).get().tolist()
res["host"] = group.all_reduce(np.array([r, 1.0])).tolist()
if hasattr(group.nccl, "NCCL_BFLOAT16"):  # CuPy builds with NCCL >= 2.10
    res["bf16"] = group.all_reduce(cp.full(4, r + 1, bfloat16())).astype(cp.float32).get().tolist()
res["gather"] = group.all_gather(cp.full(3, r, cp.float32)).get().tolist()
flat = cp.zeros(2 * W, cp.float32)
flat[2 * r:2 * r + 2] = r + 10
group.all_gather(flat[2 * r:2 * r + 2], out=flat)
res["gather_in_place"] = flat.get().tolist()
res["scatter"] = group.reduce_scatter(cp.arange(2 * W, dtype=cp.float32) * (r + 1)).get().tolist()
res["bcast"] = group.broadcast(cp.full(3, r + 5, cp.float32), root=1).get().tolist()
group.barrier()
group.close()
json.dump(res, open(os.path.join(out, f"rank{r}.json"), "w"))
"""


def launch(tmp_path, *argv, gpus=2):
    from tinyllm import parallel

    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    return parallel.launch(argparse.Namespace(gpus=gpus, argv=list(argv)), "test",
                           program=[sys.executable, str(script)])


def test_nccl_collectives_between_two_processes(tmp_path):
    assert launch(tmp_path, "run", str(tmp_path)) == 0
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(res):
        assert got["sum"] == [3.0 * i for i in range(10)]
        assert got["avg"] == [1.5 * i for i in range(10)]
        assert got["sum64"] == [2.0] * 3
        assert got["host"] == [1.0, 2.0]
        assert got.get("bf16", [3.0] * 4) == [3.0] * 4
        assert got["gather"] == [0.0] * 3 + [1.0] * 3
        assert got["gather_in_place"] == [10.0, 10.0, 11.0, 11.0]
        assert got["scatter"] == [3.0 * i for i in range(4)][2 * r:2 * r + 2]
        assert got["bcast"] == [6.0] * 3


def test_a_rank_that_hangs_is_timed_out_and_the_others_stopped(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("TIMEOUT", "5")
    t0 = time.perf_counter()
    assert launch(tmp_path, "hang", str(tmp_path)) == 1
    assert time.perf_counter() - t0 < 90
    err = capfd.readouterr().err
    assert "rank 0: all_reduce did not finish in 5 s: another rank stopped or hangs; exiting" in err
    assert "tinyllm test: rank 0 (GPU 0) exited with code 3; stopped the 1 other rank" in err


# ---- tinyllm train --gpus 2 -------------------------------------------------------------------------

def tinyllm(tmp_path, corpus, out, *extra, check=True):
    args = ["train", "--data", str(corpus), "--char", "-m", "n_layers=2", "-m", "d_model=64",
            "-m", "n_heads=4", "-m", "context_length=32", "--batch-size", "8", "--steps", "6",
            "--eval-every", "3", "--eval-iters", "2", "--sample-tokens", "0", "-q",
            "--device", "cuda", "-o", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"),
            *extra]
    proc = subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def checkpoint_arrays(path):
    return load_checkpoint(path)[1]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], err_msg=k, **FLOAT32)


def test_two_gpus_train_like_one_on_the_same_batch(tmp_path, corpus):
    tinyllm(tmp_path, corpus, "one")
    tinyllm(tmp_path, corpus, "two", "--gpus", "2")
    tinyllm(tmp_path, corpus, "zero", "--gpus", "2", "--zero1")
    one = checkpoint_arrays(tmp_path / "one" / "last.ckpt")
    assert_same(one, checkpoint_arrays(tmp_path / "two" / "last.ckpt"))
    assert_same(one, checkpoint_arrays(tmp_path / "zero" / "last.ckpt"))
    metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics if "val_loss" in x] == [3, 6]


def test_resume_on_another_number_of_gpus(tmp_path, corpus):
    every = ["--eval-every", "2"]
    tinyllm(tmp_path, corpus, "full", *every)
    tinyllm(tmp_path, corpus, "part", *every, "--steps", "2", "--gpus", "2", "--zero1")
    resume = ["--resume", str(tmp_path / "part")]
    tinyllm(tmp_path, corpus, "part", *every, "--steps", "4", *resume)  # one GPU
    tinyllm(tmp_path, corpus, "part", *every, *resume, "--gpus", "2")  # two again, to step 6
    assert load_checkpoint(tmp_path / "part" / "last.ckpt")[0]["step"] == 6
    assert_same(checkpoint_arrays(tmp_path / "full" / "last.ckpt"),
                checkpoint_arrays(tmp_path / "part" / "last.ckpt"))


def _children(pid):
    """(pid, RANK) of the processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)
            found.append((int(entry.name), rank))
    return found


def test_a_worker_that_dies_stops_the_run_with_one_line(tmp_path, corpus):
    args = ["train", "--data", str(corpus), "--char", "-m", "n_layers=2", "-m", "d_model=64",
            "-m", "n_heads=4", "-m", "context_length=32", "--batch-size", "8", "--steps",
            "100000", "--sample-tokens", "0", "-q", "--gpus", "2", "-o", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen([sys.executable, "-m", "tinyllm", *args], stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # training has started
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(2)
        (victim,) = [pid for pid, rank in _children(proc.pid) if rank == "1"]
        os.kill(victim, signal.SIGKILL)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert ("tinyllm train: rank 1 (GPU 1) was killed by SIGKILL; stopped the 1 other rank of "
            "this host") in err
    assert not _children(proc.pid)
