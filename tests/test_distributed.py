"""Data-parallel training on the CPU: the in-process group (autograd.distributed.LocalGroup, N
ranks as threads), bucketed gradient sums, ZeRO-1, data shards, training and resuming at any
number of ranks, failures, the --gpus launcher and its errors. The NCCL group with one rank
runs where CuPy sees a GPU; several GPUs: tests/test_multi_gpu.py."""

import json
import os
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import autograd
from autograd import backend, distributed
from autograd.distributed import DataParallel, LocalGroup, PeerError, ShardedAdamW, run_local
from autograd.optim import AdamW
from tinyllm import data as data_mod
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main as cli_main
from tinyllm.train import Run, TrainConfig

TINY = dict(n_layers=1, d_model=32, n_heads=2, context_length=16)
FLOAT32 = dict(rtol=1e-4, atol=5e-5)  # float32 round-off after a few AdamW steps (seen: 1.3e-5)
FLOAT64 = dict(rtol=1e-10, atol=1e-12)  # the same sums in float64 (seen: 6e-15)


# ---- the in-process group ------------------------------------------------------------------------

def per_rank(r, shape=(3, 5), dtype=np.float32):
    return np.random.default_rng(r).standard_normal(shape).astype(dtype)


def test_local_group_collectives_are_right_and_the_same_on_every_rank():
    W = 3
    want_sum = per_rank(0) + per_rank(1) + per_rank(2)  # rank order, as the group sums

    def body(g):
        out = {}
        a = per_rank(g.rank)
        out["sum"] = g.all_reduce(a.copy())
        out["avg"] = g.all_reduce(a.copy(), op="avg")
        out["gather"] = g.all_gather(a)
        flat = np.zeros(W * a.size, a.dtype)
        flat[g.rank * a.size:(g.rank + 1) * a.size] = a.ravel()
        g.all_gather(flat[g.rank * a.size:(g.rank + 1) * a.size], out=flat)  # in place
        out["gather_in_place"] = flat
        out["scatter"] = g.reduce_scatter(np.arange(6.0) * (g.rank + 1))
        out["bcast"] = g.broadcast(a.copy(), root=2)
        g.barrier()
        return out

    results = run_local(body, W)
    gathered = np.concatenate([per_rank(r).ravel() for r in range(W)])
    for r, out in enumerate(results):
        np.testing.assert_array_equal(out["sum"], want_sum)
        np.testing.assert_allclose(out["avg"], want_sum / 3, rtol=1e-6)
        np.testing.assert_array_equal(out["gather"], gathered)
        np.testing.assert_array_equal(out["gather_in_place"], gathered)
        np.testing.assert_array_equal(out["scatter"], (np.arange(6.0) * 6)[2 * r:2 * r + 2])
        np.testing.assert_array_equal(out["bcast"], per_rank(2))
    for out in results[1:]:  # bit for bit the same everywhere
        assert out["sum"].tobytes() == results[0]["sum"].tobytes()


def test_reduce_scatter_needs_equal_slices_and_ops_are_checked():
    (g,) = LocalGroup.create(1)
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        g.all_reduce(np.ones(2), op="max")

    def body(g):
        g.reduce_scatter(np.ones(5))
    with pytest.raises(PeerError, match="5 elements do not split into 2 equal slices"):
        run_local(body, 2)


def test_a_rank_that_raises_stops_the_others_at_once():
    def body(g):
        for i in range(100):
            if g.rank == 1 and i == 3:
                raise RuntimeError("boom on purpose")
            g.all_reduce(np.ones(4))
        return "finished"

    t0 = time.perf_counter()
    with pytest.raises(PeerError, match=r"^rank 1 failed: RuntimeError: boom on purpose$") as e:
        run_local(body, 3, timeout=30)
    assert time.perf_counter() - t0 < 10  # not the 30 s timeout: the others were released
    assert isinstance(e.value.__cause__, RuntimeError)


def test_a_rank_that_never_comes_times_out_the_others():
    groups = LocalGroup.create(2, timeout=0.3)
    with pytest.raises(PeerError, match=r"rank 0: stopped: a collective did not finish in 0.3 s"):
        groups[0].all_reduce(np.ones(2))  # rank 1 never calls


# ---- gradient buckets and ZeRO-1 (engine level) --------------------------------------------------

def make_params(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [autograd.Tensor(rng.standard_normal(s), requires_grad=True, dtype="float64")
            for s in sizes]


SIZES = [(4, 3), (7,), (2, 2, 2), (5,), (3, 6)]


def rank_grads(rank, step):
    rng = np.random.default_rng([rank, step])
    return [rng.standard_normal(s) for s in SIZES]


def test_bucketed_all_reduce_sums_every_gradient():
    W = 3

    def body(g):
        params = make_params(SIZES)
        dp = DataParallel(params, AdamW(params), g, bucket_bytes=100)  # several buckets
        assert len(dp.buckets) > 2
        for p, grad in zip(params, rank_grads(g.rank, 0)):
            p.grad = grad
        if g.rank == 0:
            params[1].grad = None  # a parameter without a gradient on a rank counts as zeros
        dp.reduce_grads()
        return [p.grad.copy() for p in params]

    results = run_local(body, W)
    want = [sum(rank_grads(r, 0)[i] for r in range(W)) for i in range(len(SIZES))]
    want[1] = rank_grads(1, 0)[1] + rank_grads(2, 0)[1]
    for got in results:
        for g_, w in zip(got, want):
            np.testing.assert_allclose(g_, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("W", [2, 3])
def test_zero1_steps_like_adamw_on_the_summed_gradients(W):
    steps = 4
    ref = make_params(SIZES)
    ref_opt = AdamW(ref, lr=1e-2, weight_decay=0.1)  # two groups: decay on matrices only
    for t in range(steps):
        for i, p in enumerate(ref):
            p.grad = sum(rank_grads(r, t)[i] for r in range(W))
        ref_opt.step()
        ref_opt.zero_grad()

    def body(g):
        params = make_params(SIZES)
        dp = DataParallel(params, AdamW(params, lr=1e-2, weight_decay=0.1), g, zero1=True)
        assert isinstance(dp.optimizer, ShardedAdamW)
        for t in range(steps):
            for p, grad in zip(params, rank_grads(g.rank, t)):
                p.grad = grad
            slices = dp.reduce_grads()
            assert all(p.grad is None for p in params)  # only the slices keep gradients
            assert sum(s.size for s in slices) < sum(p.size for p in params)
            dp.optimizer.step()
            dp.optimizer.zero_grad()
        return [p.data.copy() for p in params], dp.optimizer.state_dict()

    results = run_local(body, W)
    want_state = ref_opt.state_dict()
    for weights, state in results:
        for w, p in zip(weights, ref):
            np.testing.assert_allclose(w, p.data, **FLOAT64)
        assert state["step"] == steps and state["groups"] == want_state["groups"]
        assert state["state"].keys() == want_state["state"].keys()
        for i, st in want_state["state"].items():
            for name, v in st.items():
                np.testing.assert_allclose(state["state"][i][name], v, **FLOAT64)


def test_zero1_keeps_a_slice_of_the_moments():
    def body(g):
        params = make_params([(1000,), (10, 100)])
        dp = DataParallel(params, AdamW(params), g, zero1=True)
        for p in params:
            p.grad = np.ones(p.shape)
        dp.reduce_grads()
        dp.optimizer.step()
        return sum(a.size for st in dp.optimizer.inner.state.values() for a in st.values())

    held = run_local(body, 4)
    assert held == [2 * (250 + 250)] * 4  # 2 moments x (2000 / 4) per rank: a quarter each


# ---- data shards ------------------------------------------------------------------------------------

@given(st.integers(1, 200), st.integers(1, 16))
def test_shards_of_a_batch_are_disjoint_and_cover_it(n, world):
    if n < world:
        return
    slices = [data_mod.shard_rows(n, r, world) for r in range(world)]
    rows = np.concatenate([np.arange(n)[s] for s in slices])
    np.testing.assert_array_equal(rows, np.arange(n))  # each row once, in order
    sizes = [s.stop - s.start for s in slices]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_ranks_draw_their_own_rows_of_every_batch(order):
    tokens = np.arange(5000) % 251
    batches = data_mod.Batches(tokens, batch_size=6, block_size=8, seed=3, order=order)
    for k in range(5):
        x, y = batches.get(k)
        parts = [batches.get(k, data_mod.shard_rows(6, r, 4)) for r in range(4)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    if order == "sequential":  # the windows of all ranks over the steps tile the data
        starts = np.concatenate([batches.starts(k)[data_mod.shard_rows(6, r, 4)]
                                 for k in range(10) for r in range(4)])
        np.testing.assert_array_equal(starts, np.arange(60) * 8)


# ---- training -----------------------------------------------------------------------------------------

def config(out, corpus, **kw):
    base = dict(data=str(corpus), char=True, model=dict(TINY), steps=6, batch_size=6,
                block_size=16, warmup=2, lr=3e-3, eval_every=3, eval_iters=2, log_every=2,
                sample_tokens=0, quiet=True, out=str(out), data_threads=1,
                cache_dir=str(out.parent / "cache"))
    base.update(kw)
    return TrainConfig(**base)


_build = threading.Lock()  # ranks build their models one at a time: the init draws from one RNG


def run_ranks(world, make_run, zero1=False):
    """Fit `make_run(group, zero1)` on `world` in-process ranks; the runs, in rank order."""
    def body(g):
        with _build:
            run = make_run(g, zero1)
        run.fit()
        return run

    return run_local(body, world)


def fit_single(cfg, resume=None):
    ckpt = None
    if resume is not None:
        meta, arrays = load_checkpoint(resume)
        ckpt = {"path": resume, "meta": meta, "arrays": arrays}
    run = Run(cfg, resume_from=ckpt)
    run.fit()
    return run


def ranks_of(cfg, resume=None):
    def make(g, zero1):
        ckpt = None
        if resume is not None:
            meta, arrays = load_checkpoint(resume)
            ckpt = {"path": resume, "meta": meta, "arrays": arrays}
        return Run(cfg, resume_from=ckpt, group=g, zero1=zero1)
    return make


def weights(run):
    return {k: np.array(v) for k, v in run.model.state_dict().items()}


def assert_same_weights(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], err_msg=k, **tol)


@pytest.mark.parametrize("dtype, tol", [("float64", FLOAT64), ("float32", FLOAT32)])
@pytest.mark.parametrize("world", [2, 3])
def test_n_ranks_train_like_one_process_on_the_whole_batch(tmp_path, corpus, dtype, tol, world):
    # batch_size is the whole batch (6 rows): each of N ranks trains on 6 / N of them
    single = fit_single(config(tmp_path / "one", corpus, dtype=dtype, grad_accum=2))
    runs = run_ranks(world, ranks_of(config(tmp_path / "dp", corpus, dtype=dtype, grad_accum=2)))
    for run in runs:
        assert_same_weights(weights(single), weights(run), tol)
        assert run.best_val == pytest.approx(single.best_val, rel=1e-6)
    # only rank 0 wrote the run folder, and its log is the one-process log up to round-off
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    dp = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dp] == [r["step"] for r in one]
    for a, b in zip(one, dp):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_zero1_trains_like_plain_data_parallel(tmp_path, corpus):
    plain = run_ranks(3, ranks_of(config(tmp_path / "plain", corpus)))
    zero = run_ranks(3, ranks_of(config(tmp_path / "zero", corpus)), zero1=True)
    assert zero[0].dp.zero1 and not plain[0].dp.zero1
    for p, z in zip(plain, zero):
        assert_same_weights(weights(p), weights(z), FLOAT32)
    # the checkpoints hold the whole state in the same layout
    _, a = load_checkpoint(tmp_path / "plain" / "last.ckpt")
    _, b = load_checkpoint(tmp_path / "zero" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], err_msg=k, **FLOAT32)


@pytest.mark.parametrize("first, then, zero1", [(2, 3, True), (3, 1, False), (1, 2, False)])
def test_resume_at_another_number_of_ranks_continues_the_run(tmp_path, corpus, first, then,
                                                             zero1):
    full = fit_single(config(tmp_path / "full", corpus, dtype="float64"))
    part = config(tmp_path / "part", corpus, dtype="float64", steps=3)
    if first == 1:
        fit_single(part)
    else:
        run_ranks(first, ranks_of(part), zero1=zero1)
    rest = config(tmp_path / "part", corpus, dtype="float64", steps=6)
    ckpt = tmp_path / "part" / "last.ckpt"
    if then == 1:
        runs = [fit_single(rest, resume=ckpt)]
    else:
        runs = run_ranks(then, ranks_of(rest, resume=ckpt), zero1=zero1)
    for run in runs:
        assert run.step == 6
        assert_same_weights(weights(full), weights(run), FLOAT64)
    meta, arrays = load_checkpoint(ckpt)  # moments too, gathered from the slices
    _, want = load_checkpoint(tmp_path / "full" / "last.ckpt")
    assert meta["step"] == 6 and arrays.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(arrays[k], want[k], err_msg=k, **FLOAT64)
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == [3, 6]


def test_resume_on_another_device(tmp_path, corpus):
    # with --gpus each rank resumes on its own GPU ("cuda:1", ...): the device the checkpoint
    # names is where its weights were, not a setting that must match
    from tinyllm.checkpoint import save_checkpoint

    fit_single(config(tmp_path / "run", corpus, steps=3))
    path = tmp_path / "run" / "last.ckpt"
    meta, arrays = load_checkpoint(path)
    meta["model_config"]["device"] = "cuda:1"
    save_checkpoint(path, meta, arrays)
    assert fit_single(config(tmp_path / "run", corpus, steps=6), resume=path).step == 6


def test_a_rank_that_fails_in_training_stops_the_others(tmp_path, corpus):
    cfg = config(tmp_path / "run", corpus, steps=50)

    def make(g, zero1):
        run = Run(cfg, group=g)
        if g.rank == 1:
            step = run.train_step

            def failing():
                if run.step == 2:
                    raise MemoryError("out of memory on purpose")
                return step()
            run.train_step = failing
        return run

    t0 = time.perf_counter()
    with pytest.raises(PeerError, match="rank 1 failed: MemoryError: out of memory on purpose"):
        run_ranks(2, make)
    assert time.perf_counter() - t0 < 30


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, corpus):
    cfg = config(tmp_path / "run", corpus, steps=50, eval_every=50, log_every=50)

    def make(g, zero1):
        run = Run(cfg, group=g, zero1=zero1)
        if g.rank == 1:
            step = run.train_step

            def interrupted_after_step_2():
                out = step()
                if run.step == 2:
                    run._stop["flag"] = True  # what Ctrl-C does on this rank only
                return out
            run.train_step = interrupted_after_step_2
        return run

    runs = run_ranks(2, make, zero1=True)
    assert [run.step for run in runs] == [3, 3]  # the next sum over the ranks carried it
    meta, _ = load_checkpoint(tmp_path / "run" / "last.ckpt")  # saved, moments gathered
    assert meta["step"] == 3


def test_a_batch_smaller_than_the_ranks_is_refused(tmp_path, corpus):
    cfg = config(tmp_path / "run", corpus, batch_size=2)
    with pytest.raises(PeerError, match="batch_size 2 is smaller than the 3 ranks"):
        run_ranks(3, ranks_of(cfg))


# ---- fine-tuning on several ranks ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_start(tmp_path_factory):
    from tinyllm import chat
    from tinyllm.generate import save_for_generation
    from tinyllm.model import GPT
    from tinyllm.tokenizer import Tokenizer

    autograd.manual_seed(0)
    tok = chat.add_chat_tokens(Tokenizer.bytes())
    model = GPT.from_preset("laptop", vocab_size=tok.vocab_size, n_layers=1, d_model=32,
                            n_heads=2, context_length=128)
    path = tmp_path_factory.mktemp("chat") / "start"
    save_for_generation(path, model, tok, {"kind": "sft"})
    return path


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_fine_tuning_on_two_ranks_is_fine_tuning_on_the_whole_batch(tmp_path, chat_start, kind):
    if kind == "sft":
        from tinyllm.sft import SFTConfig as Config, SFTRun as RunClass
    else:
        from tinyllm.dpo import DPOConfig as Config, DPORun as RunClass

    def cfg(out):
        return Config(base=str(chat_start), n_train=48, n_val=8, steps=4, batch_size=5,
                      eval_every=2, eval_iters=2, log_every=2, warmup=1, lr=1e-3,
                      out=str(out), quiet=True, data_threads=1, dtype="float64").validate()

    single = RunClass(cfg(tmp_path / "one"))
    single.fit()

    def make(g, zero1):
        return RunClass(cfg(tmp_path / "dp"), group=g, zero1=zero1)

    for run in run_ranks(2, make, zero1=kind == "dpo"):
        assert_same_weights(weights(single), weights(run), FLOAT64)
        assert run.best_val == pytest.approx(single.best_val, rel=1e-9)


# ---- the launcher and its errors ----------------------------------------------------------------------

def tiny_args(tmp_path, corpus, *extra, out="run"):
    return ["train", "--data", str(corpus), "--char", "-m", "n_layers=1", "-m", "d_model=32",
            "-m", "n_heads=2", "-m", "context_length=16", "--steps", "2", "--batch-size", "4",
            "--sample-tokens", "0", "-q", "-o", str(tmp_path / out),
            "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--gpus", "0"], "argument --gpus: must be a positive integer, got 0"),
    (["--gpus", "two"], "argument --gpus: expected an integer, got 'two'"),
    (["--zero1"], "--zero1 shards the optimizer state over the GPUs of --gpus N; give --gpus"),
    (["--gpus", "2", "--device", "cpu"], "--device cpu: --gpus N trains on GPUs"),
    (["--gpus", "8"], "batch_size 4 is smaller than the 8 GPUs"),
])
def test_bad_gpus_settings_get_one_line(tmp_path, corpus, capsys, extra, message):
    assert cli_main(tiny_args(tmp_path, corpus, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_gpus_without_a_usable_gpu_or_too_many(tmp_path, corpus, capsys):
    count = backend.cupy_module().cuda.runtime.getDeviceCount() if backend.cuda_available() else 0
    assert cli_main(tiny_args(tmp_path, corpus, "--gpus", "4")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tinyllm train: error: --gpus 4: ")
    if count:
        assert f"this host has {count} GPU" in err or count >= 4
    else:
        assert "CuPy" in err


def test_nnodes_settings_are_checked(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("NNODES", "zero")
    assert cli_main(tiny_args(tmp_path, corpus, "--gpus", "1")) == 2
    assert "NNODES='zero': must be an integer >= 1" in capsys.readouterr().err


FAKE_WORKER = """
import json, os, sys, time
rank = int(os.environ["RANK"])
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                          "MASTER_PORT")} | {"argv": sys.argv[2:]}, f)
if sys.argv[2] == "fail" and rank == 1:
    time.sleep(0.5)
    sys.exit(7)
if sys.argv[2] == "fail":
    time.sleep(120)  # stopped by the launcher long before
"""


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_the_launcher_starts_one_worker_per_gpu_and_stops_them_when_one_fails(
        tmp_path, capsys, monkeypatch, mode):
    import argparse

    from tinyllm import parallel

    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(gpus=3, argv=[str(tmp_path), mode, "--gpus", "3"])
    t0 = time.perf_counter()
    code = parallel.launch(args, "train", program=[sys.executable, str(script)])
    assert time.perf_counter() - t0 < 60
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [s["RANK"] for s in seen] == ["0", "1", "2"]
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "2"]
    assert {s["WORLD_SIZE"] for s in seen} == {"3"} and {s["MASTER_ADDR"] for s in seen} == {"127.0.0.1"}
    assert len({s["MASTER_PORT"] for s in seen}) == 1
    assert seen[0]["argv"] == [mode, "--gpus", "3"]
    err = capsys.readouterr().err.strip()
    if mode == "ok":
        assert code == 0 and err == ""
    else:
        assert code == 1
        assert err == ("tinyllm train: rank 1 (GPU 1) exited with code 7; stopped the 2 other "
                       "ranks of this host")


def test_the_launcher_numbers_the_ranks_of_a_second_host(tmp_path, monkeypatch):
    import argparse

    from tinyllm import parallel

    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    args = argparse.Namespace(gpus=2, argv=[str(tmp_path), "ok"])
    with pytest.raises(Exception, match="NNODES=2: set MASTER_ADDR and MASTER_PORT"):
        parallel.launch(args, "train", program=[sys.executable, str(script)])
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert parallel.launch(args, "train", program=[sys.executable, str(script)]) == 0
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (2, 3)]
    assert [(s["RANK"], s["LOCAL_RANK"], s["WORLD_SIZE"]) for s in seen] == [("2", "0", "4"),
                                                                             ("3", "1", "4")]
    assert {(s["MASTER_ADDR"], s["MASTER_PORT"]) for s in seen} == {("10.0.0.1", "29511")}


# ---- NCCL with one rank (where CuPy sees a GPU) ---------------------------------------------------

needs_nccl = pytest.mark.skipif(not backend.cuda_available(), reason="needs CuPy and a CUDA GPU")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@needs_nccl
def test_nccl_group_of_one_rank():
    cp = backend.cupy_module()
    group = distributed.NcclGroup(0, 1, "127.0.0.1", _free_port(), timeout=120)
    try:
        a = cp.arange(6, dtype=cp.float32)
        assert group.all_reduce(a) is a
        cp.testing.assert_array_equal(a, cp.arange(6, dtype=cp.float32))
        host = np.array([1.5, 2.5])
        assert group.all_reduce(host, op="avg") is host and host.tolist() == [1.5, 2.5]
        cp.testing.assert_array_equal(group.all_gather(a), a)
        flat = cp.zeros(6, cp.float32)
        flat[:] = 7
        group.all_gather(flat[0:6], out=flat)
        cp.testing.assert_array_equal(flat, cp.full(6, 7, cp.float32))
        cp.testing.assert_array_equal(group.reduce_scatter(a), a)
        b = cp.ones((2, 3), cp.float64)
        group.broadcast(b)
        cp.testing.assert_array_equal(b, cp.ones((2, 3)))
        group.barrier()
    finally:
        group.close()


@needs_nccl
@pytest.mark.parametrize("zero1", [False, True])
def test_gpus_1_trains_like_one_gpu_without_it(tmp_path, corpus, zero1):
    # the whole path: launcher, worker process, rendezvous, NCCL group of one, DataParallel
    import subprocess

    steps = ["--device", "cuda", "--steps", "4", "--eval-every", "2"]
    assert cli_main(tiny_args(tmp_path, corpus, *steps, out="plain")) == 0
    args = tiny_args(tmp_path, corpus, *steps, "--gpus", "1", *(["--zero1"] if zero1 else []),
                     out="one")
    out = subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    _, a = load_checkpoint(tmp_path / "plain" / "last.ckpt")
    _, b = load_checkpoint(tmp_path / "one" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], err_msg=k, **FLOAT32)
