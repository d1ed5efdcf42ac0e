"""Training on several GPUs: `--gpus N` (and `--zero1`) on tinyllm train, sft and dpo.

    tinyllm train --gpus 2 ...                      # one host: 2 worker processes, one per GPU
    NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 MASTER_PORT=29500 tinyllm train --gpus 8 ...
                                                    # the same on each host, NODE_RANK its number

The command the user starts is the launcher: it checks the settings, then runs the same command
line once per GPU, each process with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
in its environment. A process started with --gpus and RANK set is a worker: it takes GPU
LOCAL_RANK, joins the NCCL group (autograd.distributed.NcclGroup) and trains its rank's rows of
every micro-batch (train.Run); rank 0 alone logs and writes the run folder. The batch size is
the whole batch, split over the ranks, so a run computes the same steps on any number of GPUs
(up to round-off) and resumes on any number. The launcher waits for its workers; when one fails
it stops the others and names the rank in one line.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from autograd import backend, distributed
from tinyllm.cli import UsageError, positive_int


def add_arguments(p):
    p.add_argument("--gpus", type=positive_int, metavar="N",
                   help="data-parallel training on N GPUs of this host, one process each; the "
                        "batch size is the whole batch, split over them (several hosts: run the "
                        "same command on each with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT)")
    p.add_argument("--zero1", action="store_true",
                   help="with --gpus: each GPU keeps and updates only its slice of the AdamW "
                        "state (ZeRO-1): less memory, the same steps")


def is_worker(args):
    return bool(getattr(args, "gpus", None)) and "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name, default, low):
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise UsageError(f"{name}={text!r}: must be an integer >= {low}")
    return value


def check(args, batch_size):
    """The rules of --gpus and --zero1, before any work: one UsageError naming what is wrong."""
    gpus = getattr(args, "gpus", None)
    if getattr(args, "zero1", False) and not gpus:
        raise UsageError("--zero1 shards the optimizer state over the GPUs of --gpus N; give --gpus")
    if not gpus:
        return
    if getattr(args, "device", None) not in (None, "cuda"):
        raise UsageError(f"--device {args.device}: --gpus N trains on GPUs 0..N-1 of each host "
                         "(leave --device out, or give cuda)")
    world = gpus * _env_int("NNODES", 1, 1)
    if batch_size < world:
        raise UsageError(f"batch_size {batch_size} is smaller than the {world} GPUs: each needs "
                         "at least one row of every micro-batch")
    if is_worker(args):
        return
    try:
        count = backend.cupy_module().cuda.runtime.getDeviceCount()
        if gpus > count:
            raise UsageError(f"--gpus {gpus}: this host has {count} GPU{'s' if count != 1 else ''}")
        distributed.nccl_module()
    except RuntimeError as e:
        raise UsageError(f"--gpus {gpus}: {e}") from None


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch(args, command, program=None):
    """Run this command line once per GPU as workers (`program`: what to run instead of
    `python -m tinyllm`); wait for them. Returns the exit code: 0 when all finished, 130 when
    they stopped on Ctrl-C, 1 when one failed (the others are then stopped, and one line names
    the failed rank)."""
    gpus = args.gpus
    nnodes, node_rank = _env_int("NNODES", 1, 1), _env_int("NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise UsageError(f"NODE_RANK={node_rank}: must be below NNODES={nnodes}")
    if nnodes > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise UsageError(f"NNODES={nnodes}: set MASTER_ADDR and MASTER_PORT (the host and a free "
                         "port of node 0) on every host")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", None, 1) or _free_port()
    argv = list(program or [sys.executable, "-m", "tinyllm"]) + list(args.argv)
    procs = []
    for i in range(gpus):
        env = dict(os.environ, RANK=str(node_rank * gpus + i), LOCAL_RANK=str(i),
                   WORLD_SIZE=str(nnodes * gpus), MASTER_ADDR=addr, MASTER_PORT=str(port))
        procs.append(subprocess.Popen(argv, env=env))
    return _wait(procs, node_rank * gpus, command)


def _wait(procs, first_rank, command):
    interrupts = 0
    while True:
        try:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0, 130)]
            if failed:
                i, code = failed[0], codes[failed[0]]
                others = _stop(procs)
                how = (f"was killed by {signal.Signals(-code).name}" if code < 0
                       else f"exited with code {code}")
                print(f"tinyllm {command}: rank {first_rank + i} (GPU {i}) {how}; stopped the "
                      f"{others} other rank{'s' if others != 1 else ''} of this host",
                      file=sys.stderr, flush=True)
                return 1
            if all(c is not None for c in codes):
                return 130 if 130 in codes else 0
            time.sleep(0.2)
        except KeyboardInterrupt:  # the workers got it too: they finish the step and save
            interrupts += 1
            if interrupts > 1:
                _stop(procs)
                return 130


def _stop(procs, grace=10.0):
    """Terminate the workers still running (killed after `grace` seconds); how many there were."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in running:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return len(running)


@contextlib.contextmanager
def worker(args, cfg, command):
    """In a worker (see is_worker): use GPU LOCAL_RANK (cfg.device set to it) and yield this
    rank's NCCL group, closed at the end; elsewhere yield None."""
    if not is_worker(args):
        yield None
        return
    local = _env_int("LOCAL_RANK", 0, 0)
    rank = os.environ["RANK"]
    cp = backend.cupy_module()
    cp.cuda.Device(local).use()
    cfg.device = "cuda" if local == 0 else f"cuda:{local}"
    try:
        group = distributed.NcclGroup.from_env()
    except distributed.PeerError as e:
        print(f"tinyllm {command} (rank {rank}): {e}", file=sys.stderr, flush=True)
        raise SystemExit(distributed.EXIT_PEER) from None
    try:
        yield group
    except BaseException:
        group.abort()  # a clean close would wait on the other ranks, which wait on this one
        raise
    group.close()
