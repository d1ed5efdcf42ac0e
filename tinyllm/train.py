"""Pretraining: corpus -> tokenizer -> token files -> model -> checkpoints, in one call.

    tinyllm train                                   # laptop preset, built-in corpus, CPU
    tinyllm train --data input.txt --char --config examples/shakespeare_char.toml
    tinyllm train --resume runs/laptop              # continue exactly where it stopped

Settings come in three layers, each overriding the one before: the defaults of TrainConfig,
a config file (TOML or JSON: training keys at the top level, model overrides in a `[model]`
table), then the command line. The training loop is plain:

    for step in range(start, steps):
        lr = schedule(step)
        for each micro-batch: loss = model(x, y) / grad_accum; loss.backward()
        grad_norm = clip_grad_norm(params, clip)
        optimizer.step(); optimizer.zero_grad()
        every log_every steps: one log line;  every eval_every: validation, checkpoints

On a CPU with several cores each micro-batch is split along the batch axis and the slices
run forward and backward on threads at once (`data_threads`; see `accumulate_grads`).

The run folder gets config.json, tokenizer.json, metrics.jsonl (one JSON object per log line
or evaluation), last.ckpt and best.ckpt (lowest validation loss). Batch k is a pure function
of (seed, k) and the checkpoint holds the weights, optimizer moments, step and RNG state, so
`--resume` continues bit for bit as if never stopped. Ctrl-C finishes the current step,
saves last.ckpt and exits; a second Ctrl-C stops at once.
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import autograd
from autograd import amp, backend, distributed, fast
from autograd.optim import AdamW, clip_grad_norm, grad_norm, make_schedule
from tinyllm import data as data_mod
from tinyllm import perf
from tinyllm.atomic import atomic_write
from tinyllm.checkpoint import CheckpointError, check_match, load_checkpoint, save_checkpoint
from tinyllm.cli import UsageError, check_choice, check_float, check_int
from tinyllm.perf import (  # noqa: F401  (the post-training commands import them from here)
    blas_thread_count, run_slices, set_blas_threads, usable_cores,
)


@dataclass
class TrainConfig:
    # data and tokenizer
    data: str = "builtin"  # "builtin" (CPython's pydoc topics), a .txt file, or a folder
    tokenizer: str | None = None  # a saved tokenizer; None: train one (or bytes with char=True)
    char: bool = False  # byte-level tokenizer, no merges (character level for ASCII)
    vocab_size: int = 1024  # merges + 256 bytes when training a tokenizer
    val_fraction: float = 0.1
    cache_dir: str | None = None  # token/tokenizer cache; None: $TINYLLM_CACHE or ~/.cache/tinyllm
    # model
    init_from: str | None = None  # start from these trained weights and their tokenizer
    preset: str = "laptop"
    model: dict = field(default_factory=dict)  # ModelConfig overrides (flavour, n_layers, ...)
    # optimization
    steps: int = 600
    batch_size: int = 16
    block_size: int | None = None  # tokens per window; None: the model's context length
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 30
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    clip: float = 1.0  # global gradient-norm clip; 0 disables
    # bookkeeping
    seed: int = 1337
    log_every: int = 20
    eval_every: int = 100
    eval_iters: int = 20  # validation batches per evaluation (fixed windows)
    out: str | None = None  # run folder; None: runs/<preset>
    device: str = "cpu"
    # float32 | float64: the parameters' dtype; tf32 | bfloat16 | float16: float32 parameters
    # with the matrix products in that precision (autograd.amp); float16 adds loss scaling
    dtype: str = "float32"
    loss_scaling: bool = True  # float16 only: dynamic loss scaling (amp.GradScaler)
    sample_tokens: int = 300  # printed at the end; 0: none
    prompt: str = ""  # sample prompt; "" starts a fresh document
    temperature: float = 0.8
    top_k: int | None = 40
    peak_flops: float | None = None  # for MFU on a GPU; None: guessed from the device name
    threads: int | None = None  # BLAS threads on the CPU; None: the library's default
    # CPU: each micro-batch split over this many threads (see accumulate_grads); "auto": the
    # usable cores (or `threads` when set), at most 4 and at most batch_size; 1: no split
    data_threads: int | str = "auto"
    # keep only each block's input in training forwards and recompute the block in backward
    # (activation checkpointing): less memory for one more forward of each block
    checkpoint_blocks: bool = False
    # the training-health monitor (tinyllm.monitor): per-layer figures of each logged step (and
    # of the first) in metrics.jsonl under "monitor"
    monitor: bool = False
    # the GPU step as one CUDA graph, captured at the second step and replayed (static shapes):
    # "auto" when the run allows it (else a note says why not), "on" (a run that cannot stops
    # with the reason), "off"
    cuda_graph: str = "auto"
    quiet: bool = False

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, source="config"):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training settings {unknown}; known: "
                             f"{', '.join(sorted(known))}")
        return cls(**d)


def default_out(cfg):
    """runs/<preset>, or <init-from folder>-continued."""
    if cfg.init_from:
        return str(Path(cfg.init_from.rstrip("/")).with_suffix("")) + "-continued"
    return f"runs/{cfg.preset}"


def validate_common(cfg):
    """Check the settings every training run has (TrainConfig, SFTConfig, ...): one
    UsageError naming the setting, the value and what is allowed, before any work."""
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_iters"):
        check_int(name, getattr(cfg, name), low=1)
    check_int("warmup", cfg.warmup, low=0)
    check_int("seed", cfg.seed)
    check_float("lr", cfg.lr, low=0, low_open=True)
    check_float("min_lr", cfg.min_lr, low=0)
    check_float("weight_decay", cfg.weight_decay, low=0)
    check_float("beta1", cfg.beta1, low=0, high=1, high_open=True)
    check_float("beta2", cfg.beta2, low=0, high=1, high_open=True)
    check_float("eps", cfg.eps, low=0, low_open=True)
    check_float("clip", cfg.clip, low=0)
    check_float("peak_flops", cfg.peak_flops, low=0, low_open=True, allow_none=True)
    check_int("threads", cfg.threads, low=1, allow_none=True)
    check_choice("schedule", cfg.schedule, ("cosine", "linear", "constant"))
    check_choice("dtype", cfg.dtype, ("float32", "float64") + PRECISIONS)
    if not isinstance(cfg.device, str) or not (cfg.device == "cpu" or cfg.device == "cuda"
                                               or cfg.device.startswith("cuda:")):
        raise UsageError(f"device: must be cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.data_threads != "auto":
        check_int("data_threads", cfg.data_threads, low=1)
    if hasattr(cfg, "cuda_graph"):
        check_choice("cuda_graph", cfg.cuda_graph, ("auto", "on", "off"))
    for name in ("checkpoint_blocks", "quiet", "monitor", "loss_scaling"):
        if hasattr(cfg, name) and not isinstance(getattr(cfg, name), bool):
            raise UsageError(f"{name}: must be true or false, got {getattr(cfg, name)!r}")


def validate_train(cfg):
    """TrainConfig's own settings, after the common ones."""
    from tinyllm.config import PRESETS

    validate_common(cfg)
    check_int("vocab_size", cfg.vocab_size, low=256)
    check_float("val_fraction", cfg.val_fraction, low=0, high=1, low_open=True, high_open=True)
    check_int("block_size", cfg.block_size, low=1, allow_none=True)
    check_int("sample_tokens", cfg.sample_tokens, low=0)
    check_float("temperature", cfg.temperature, low=0)
    check_int("top_k", cfg.top_k, low=0, allow_none=True)
    check_choice("preset", cfg.preset, tuple(PRESETS))
    if not isinstance(cfg.model, dict):
        raise UsageError(f"model: must be a table of model settings, got {cfg.model!r}")
    if cfg.init_from and cfg.model:
        raise UsageError(f"model: --init-from {cfg.init_from} takes the model's shapes and "
                         f"settings from there; -m/[model] overrides {sorted(cfg.model)} cannot "
                         "be applied")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).exists():
        raise UsageError(f"tokenizer: {cfg.tokenizer}: no such file")
    return cfg


RUN_FILES = ("last.ckpt", "best.ckpt", "metrics.jsonl", "config.json", "tokenizer.json",
             "adapter.safetensors", "loss.png")


def check_run_folder(path, resume=False, overwrite=False):
    """Refuse to start a new run in a folder that holds one, unless told to replace it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"out: {path} is a file, not a folder")
    held = [n for n in RUN_FILES[:3] if (path / n).exists()]
    if held and not resume and not overwrite:
        raise UsageError(f"{path} already holds a run ({', '.join(held)}): pass --resume {path} "
                         f"to continue it, --overwrite to replace it, or --out for a new folder")


# Settings that may change when resuming (they do not change what a step computes).
RESUMABLE = {"steps", "log_every", "eval_every", "eval_iters", "out", "sample_tokens", "prompt",
             "temperature", "top_k", "peak_flops", "quiet", "cache_dir", "device", "data",
             "threads", "data_threads", "checkpoint_blocks", "monitor", "cuda_graph"}


def read_config_file(path):
    """A dict from a TOML (.toml) or JSON file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read config file: {e.strerror or e}") from None
    if path.suffix == ".json":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise RuntimeError(f"{path}: reading TOML needs Python 3.11+ or the tomli package; "
                               "or write the config as JSON") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None


# ---- setup -------------------------------------------------------------------------------

def log(cfg, *args, **kwargs):
    if not cfg.quiet:
        print(*args, **kwargs, flush=True)


def build_tokenizer(cfg, docs):
    """The saved tokenizer, bytes-only (char), or one trained on the corpus (cached)."""
    from tinyllm.tokenizer import Tokenizer

    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    if cfg.char or cfg.vocab_size <= 256:
        return Tokenizer.bytes()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else data_mod.default_cache_dir()
    key = data_mod.corpus_hash(docs)[:16]
    path = cache / "tokenizers" / f"{key}-v{cfg.vocab_size}.json"
    if path.exists():
        return Tokenizer.load(path)
    t0 = time.perf_counter()
    tok = Tokenizer.train((text for _, text in docs), cfg.vocab_size)
    log(cfg, f"trained a {tok.vocab_size}-token BPE tokenizer in {time.perf_counter() - t0:.1f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


PRECISIONS = ("tf32", "bfloat16", "float16")  # mixed-precision modes of autograd.amp


def param_dtype(dtype):
    """The parameters' dtype for a --dtype setting: float32 under the mixed-precision modes."""
    return "float32" if dtype in PRECISIONS else dtype


def build_model(cfg, vocab_size):
    from tinyllm.model import GPT

    overrides = dict(cfg.model)
    overrides["vocab_size"] = vocab_size
    overrides.setdefault("device", cfg.device)
    overrides.setdefault("dtype", param_dtype(cfg.dtype))
    return GPT.from_preset(cfg.preset, **overrides)


def peak_flops_guess(device):
    """Dense bf16 tensor-core peak of a few common GPUs (None when unknown, e.g. on the CPU)."""
    if not device.startswith("cuda"):
        return None
    try:
        cp = backend.cupy_module()
        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    except Exception:
        return None
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("4090", 165e12),
                       ("A10", 125e12), ("L4", 121e12), ("T4", 65e12)):
        if key in name:
            return flops
    return None


def shard_count(setting, batch_size, device="cpu", dropout=0.0, threads=None):
    """How many threads share each micro-batch (`data_threads`; see accumulate_grads).

    "auto": the usable cores, or `threads` (the BLAS threads asked for) when given, at most 4
    (past that the threads wait on each other for Python's lock); 1 on a GPU, where one
    device runs the whole batch, and with dropout, whose masks come from one shared
    generator (threads would draw from it in no fixed order). Never more than the batch.
    """
    if setting == "auto":
        n = 1 if device != "cpu" or dropout > 0 else min(threads or usable_cores(), 4)
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        n = setting
        if n > 1 and device != "cpu":
            raise ValueError(f"data_threads {n}: splitting a micro-batch over threads is for "
                             f"the CPU; on {device} use data_threads 1 or auto")
        if n > 1 and dropout > 0:
            raise ValueError(f"data_threads {n} needs dropout 0 (got {dropout}): the dropout "
                             "masks come from one generator that threads would draw from in no "
                             "fixed order; use data_threads 1 or auto")
    else:
        raise ValueError(f"data_threads must be a positive integer or 'auto', not {setting!r}")
    return max(1, min(n, batch_size))


def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- one optimizer step ------------------------------------------------------------------------

IGNORE_INDEX = -100  # targets equal to this count for nothing (GPT.forward's ignore_index)


def accumulate_grads(model, params, micro_batches, shards=1, scaler=None, weights=None):
    """Forward and backward of each (x, y) micro-batch, its loss weighted 1 / len(micro_batches)
    (the mean over them) or by `weights`, gradients added into each parameter's .grad; returns
    the weighted sum of the losses. A micro-batch of weight 0 is skipped (a data-parallel rank
    whose rows of it have no counted target). `scaler`: a float16 GradScaler, whose scale
    multiplies the loss before backward. `shards` > 1 splits each micro-batch along the batch
    axis over that many threads (`_sharded_backward`)."""
    if weights is None:
        weights = [1.0 / len(micro_batches)] * len(micro_batches)
    total = 0.0
    for (x, y), weight in zip(micro_batches, weights):
        if weight == 0:
            continue
        if shards > 1:
            total += _sharded_backward(model, params, x, y, weight, shards, scaler)
            continue
        # the loss without the (tokens, vocab) logits: see GPT.forward(return_logits=False)
        _, loss = model(x, y, return_logits=False)
        if weight != 1:
            loss = loss * weight
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.item()
    return total


def _sharded_backward(model, params, x, y, weight, shards, scaler=None):
    """One micro-batch as `shards` slices of its rows, each slice's forward and backward
    (autograd.grad, which leaves .grad alone) on its own thread; the slices' gradients are
    then added into .grad in slice order. Returns the micro-batch's weighted mean loss.

    Why: NumPy runs every elementwise op (softmax, norms, RoPE, SwiGLU, the loss) on one
    core; only the matrix products use the BLAS's threads, and small products gain little
    from them. NumPy and the BLAS release Python's lock inside their loops, so slices of the
    batch on threads keep every core busy through the whole step. Meanwhile the BLAS runs
    on 1 thread, so the slices do not compete with its threads for the cores.

    The batch's mean loss is sum_i (n_i / n) mean_i over slices of n_i counted targets, so
    slice i's loss is weighted by n_i / n. The slices' gradients are summed in a fixed order,
    so a run is the same from one time to the next (it differs from the unsplit step in the
    last bits, as the sums run in another order).
    """
    xs, ys = np.array_split(x, shards), np.array_split(y, shards)
    counts = [int((yi != IGNORE_INDEX).sum()) for yi in ys]
    n = sum(counts)
    slices = [(xi, yi, c / n) for xi, yi, c in zip(xs, ys, counts) if c]
    if not slices:  # every target ignored: the mean loss is nan, as in the unsplit step
        slices = [(x, y, 1.0)]

    def forward_backward(xi, yi, share):
        _, loss = model(xi, yi, return_logits=False)
        loss = loss * (weight * share)
        grads = autograd.grad(scaler.scale(loss) if scaler else loss, params, allow_unused=True)
        return loss.item(), grads

    results = run_slices(forward_backward, slices)
    for k, p in enumerate(params):
        grads = [g[k] for _, g in results if g[k] is not None]
        if not grads:
            continue
        total = grads[0]  # a fresh array from autograd.grad: summed in place
        for g in grads[1:]:
            total += g
        p.grad = total if p.grad is None else p.grad + total
    return sum(loss for loss, _ in results)


def apply_update(params, optimizer, clip, scaler=None, dp=None):
    """Clip the gradients' global norm to `clip` (0: no clipping), take the optimizer step and
    zero the gradients; returns the norm before clipping. With a float16 GradScaler the
    gradients are unscaled first, and a step whose gradients overflowed is skipped: the loss
    scale is lowered, the weights are kept, and the norm returned is inf. `dp`: data-parallel
    training (autograd.distributed.DataParallel): the gradients are first summed over the
    ranks (under ZeRO-1 each rank then holds and updates a slice; the norm is the slices')."""
    if dp is not None:
        params = dp.reduce_grads()
    finite = scaler.unscale_(params) if scaler else True
    norm = dp.grad_norm(params) if dp is not None else grad_norm(params) if finite else math.inf
    if scaler and not (finite and math.isfinite(norm)):  # every rank sees the same norm
        scaler.found_inf = True
        scaler.update()
        optimizer.zero_grad()
        return math.inf
    if clip and math.isfinite(norm):
        clip_grad_norm(params, clip, norm=norm)
    if not math.isfinite(norm):  # an update now would write inf/NaN into the weights
        optimizer.zero_grad()
        raise FloatingPointError(f"the gradient norm is {norm}")
    optimizer.step()
    optimizer.zero_grad()
    if scaler:
        scaler.update()
    return norm


class Run:
    """Everything a training run holds; `train(cfg)` builds one and calls `fit()`."""

    command = "train"  # the subcommand that resumes it
    every_target_counts = True  # no masked targets: a micro-batch's count is its rows x T
    perplexity = True  # the validation loss is a cross-entropy: its exp is worth a column
    val_metrics = {}  # more figures of the last evaluate(), for its log line and record

    def __init__(self, cfg, resume_from=None, group=None, zero1=False):
        """`group`: an autograd.distributed Group for data-parallel training: this process is
        one rank; it trains on its rows of every micro-batch (`rows`), and only rank 0 logs
        and writes files. `zero1`: shard the optimizer state over the ranks (ZeRO-1)."""
        self.group = group
        self.rank, self.world_size = (group.rank, group.world_size) if group else (0, 1)
        self.is_main = self.rank == 0
        if not self.is_main:
            cfg = dataclasses.replace(cfg, quiet=True)
        if cfg.batch_size < self.world_size:
            raise UsageError(f"batch_size {cfg.batch_size} is smaller than the {self.world_size} "
                             "ranks: each needs at least one row of every micro-batch")
        self.rows = data_mod.shard_rows(cfg.batch_size, self.rank, self.world_size)
        self.cfg = cfg
        self.run_dir = Path(cfg.out or self.default_out())
        self.overwrite = False  # fit() then removes an old run's files before writing
        if cfg.threads and cfg.device == "cpu" and not set_blas_threads(cfg.threads):
            log(cfg, f"note: could not set BLAS threads to {cfg.threads} (unknown BLAS library)")
        if cfg.device == "cpu":
            perf.reuse_freed_memory()  # each step reuses the last one's pages (~20% faster)
        autograd.manual_seed(cfg.seed)
        if cfg.dtype not in ("float32", "float64") + PRECISIONS:
            raise ValueError(f"dtype must be one of float32, float64, {', '.join(PRECISIONS)}; "
                             f"got {cfg.dtype!r}")
        if cfg.device == "cpu" and cfg.dtype in ("bfloat16", "float16") and not cfg.quiet:
            print(f"warning: --dtype {cfg.dtype} on the CPU is emulated by NumPy and many times "
                  "slower than float32; it is meant for GPUs", file=sys.stderr)
        amp.set_precision(cfg.dtype if cfg.dtype in PRECISIONS else "float32")
        self.scaler = (amp.GradScaler() if cfg.dtype == "float16"
                       and getattr(cfg, "loss_scaling", True) else None)
        self.setup(resume_from)  # tokenizer, model, data: self.tokenizer, .model, .data_meta
        self.model.checkpoint_blocks = cfg.checkpoint_blocks
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.monitor = None
        if getattr(cfg, "monitor", False):
            from tinyllm.monitor import Monitor

            self.monitor = Monitor(self.model)
        self.monitor_figures = None  # the last monitored step's
        self.shards = shard_count(cfg.data_threads, cfg.batch_size, cfg.device,
                                  self.model.config.dropout, cfg.threads)
        self.optimizer = AdamW(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                               eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.schedule = make_schedule(cfg.schedule, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
        self.step = 0
        self.best_val = math.inf
        self.tokens_seen = 0  # tokens through the model since the last log line (padding too)
        self.padding_seen = 0  # of which padding (micro_batch counts it)
        self.peak = cfg.peak_flops or peak_flops_guess(cfg.device)
        self.tokenizer_json = self.tokenizer.to_json()
        if resume_from is not None:
            self._restore(resume_from)
        self.dp = None
        if group is not None:  # after the restore: ZeRO-1 takes its slices of the moments
            self.dp = distributed.DataParallel(self.params, self.optimizer, group, zero1=zero1)
            self.optimizer = self.dp.optimizer
        elif zero1:
            raise ValueError("zero1 shards the optimizer over data-parallel ranks: give a group")
        if self.rank:  # its own dropout masks (rank 0 keeps the one-process stream)
            autograd.manual_seed(int(np.random.SeedSequence([cfg.seed, self.rank, self.step])
                                     .generate_state(1)[0]))
        self.step_graph = None  # the captured step (see graph_step), once made
        self.eager_steps = 0  # steps run uncaptured by this process
        self.graph_setting = getattr(cfg, "cuda_graph", "off")
        blockers = self.graph_blockers() if self.graph_setting != "off" else []
        if blockers and self.graph_setting == "on":
            raise UsageError("cuda_graph on: the step cannot be captured: " + "; ".join(blockers))
        if blockers and cfg.device != "cpu":
            log(cfg, "note: the step runs uncaptured (no CUDA graph): " + "; ".join(blockers))
        self.use_graph = self.graph_setting != "off" and not blockers

    # ---- data: what a kind of run overrides ----------------------------------------------------
    def default_out(self):
        return default_out(self.cfg)

    def setup(self, resume_from):
        """Pretraining: the corpus, its tokenizer (the checkpoint's when resuming), the token
        files, a fresh model, the batches and the fixed validation windows."""
        cfg = self.cfg
        self.docs = data_mod.load_corpus(cfg.data)
        init = None
        if resume_from is not None:
            self.tokenizer = self._resume_tokenizer(resume_from)
        elif cfg.init_from:  # nanoGPT's init_from: trained weights, new data and schedule
            from tinyllm.generate import load_for_generation

            init, self.tokenizer = load_for_generation(cfg.init_from, tokenizer=cfg.tokenizer,
                                                       device=cfg.device,
                                                       dtype=param_dtype(cfg.dtype))
        else:
            self.tokenizer = build_tokenizer(cfg, self.docs)
        self.dataset = data_mod.prepare_dataset(self.docs, self.tokenizer, cfg.cache_dir,
                                                cfg.val_fraction, progress=not cfg.quiet)
        if init is not None:
            self.model = init
        elif cfg.init_from:  # resuming a run that started from other weights: their shapes
            from tinyllm.model import GPT, ModelConfig

            saved = dict(resume_from["meta"]["model_config"], device=cfg.device,
                         dtype=param_dtype(cfg.dtype))
            self.model = GPT(ModelConfig.from_dict(saved))
        else:
            self.model = build_model(cfg, self.tokenizer.vocab_size)
        self.block_size = cfg.block_size or self.model.config.context_length
        if self.block_size > self.model.config.context_length:
            raise ValueError(f"block_size {self.block_size} exceeds the model's context length "
                             f"{self.model.config.context_length}")
        self.batches = data_mod.Batches(self.dataset.train, cfg.batch_size, self.block_size,
                                        seed=cfg.seed)
        self.val_starts = data_mod.eval_windows(self.dataset.val, self.block_size,
                                                cfg.eval_iters * cfg.batch_size)
        self.data_meta = {k: self.dataset.meta.get(k) for k in ("key", "train_tokens", "val_tokens")}
        self.data_summary = (f"data: {len(self.dataset.train):,} train / "
                             f"{len(self.dataset.val):,} val tokens")
        self.batch_summary = (f"{cfg.batch_size * self.block_size * cfg.grad_accum:,} tokens "
                              f"(batch {cfg.batch_size} x {self.block_size}"
                              f"{f' x {cfg.grad_accum} micro-batches' if cfg.grad_accum > 1 else ''})")

    def micro_batch(self, k):
        """This rank's rows of micro-batch k of the run, (x, y) as NumPy integer arrays: a pure
        function of k."""
        return self.batches.get(k, self.rows)

    def val_batches(self):
        """The fixed validation batches, (x, y) pairs."""
        B = self.cfg.batch_size
        for i in range(0, len(self.val_starts), B):
            yield data_mod.windows_at(self.dataset.val, self.val_starts[i:i + B], self.block_size)

    def describe_model(self):
        return f"model: {self.cfg.preset} ({self.model.config.n_layers} layers, " \
               f"d_model {self.model.config.d_model})"

    def extra_meta(self):
        """More checkpoint metadata (a kind of run adds its own)."""
        return {}

    def log_metrics(self):
        """More figures for the log line and its metrics record (means since the last line; a
        kind of run adds its own, e.g. DPO's reward margins)."""
        return {}

    # ---- checkpoints ---------------------------------------------------------------------------
    def _resume_tokenizer(self, ckpt):
        """The checkpoint's tokenizer; one named in the config must be the same."""
        from tinyllm.tokenizer import Tokenizer

        tok = Tokenizer.from_json(ckpt["meta"]["tokenizer"], source=str(ckpt["path"]))
        if self.cfg.tokenizer and not self.cfg.init_from:
            asked = Tokenizer.load(self.cfg.tokenizer)
            a, b = data_mod.tokenizer_fingerprint(asked), ckpt["meta"]["tokenizer_sha256"]
            if a != b:
                raise CheckpointError(
                    f"{ckpt['path']}: tokenizer does not match: {self.cfg.tokenizer} "
                    f"(vocab {asked.vocab_size}, sha256 {a[:12]}) is not the checkpoint's "
                    f"(vocab {tok.vocab_size}, sha256 {b[:12]})")
        return tok

    def state(self):
        """(meta, arrays) of the whole training state."""
        arrays = {f"model/{k}": backend.to_device(v, "cpu")
                  for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        for i, st in opt.pop("state").items():
            for k, v in st.items():
                arrays[f"optim/{i}/{k}"] = v
        meta = {
            "step": self.step,
            "batches_seen": self.step * self.cfg.grad_accum,
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "train_config": self.cfg.to_dict(),
            "model_config": self.model.config.to_dict(),
            "tokenizer": self.tokenizer_json,
            "tokenizer_sha256": data_mod.tokenizer_fingerprint(self.tokenizer),
            "optimizer": opt,
            "schedule": self.schedule.state_dict(),
            "rng": backend.get_rng_state(),
            "grad_scaler": self.scaler.state_dict() if self.scaler else None,
            "dataset": self.data_meta,
            **self.extra_meta(),
        }
        return meta, arrays

    def save(self, name):
        """Write the checkpoint `name` (rank 0; the path, None on the other ranks). Under ZeRO-1
        every rank calls it: the optimizer's slices are gathered into the full state."""
        if not self.is_main and not (self.dp and self.dp.zero1):
            return None
        meta, arrays = self.state()
        if not self.is_main:
            return None
        return save_checkpoint(self.run_dir / name, meta, arrays)

    def _restore(self, ckpt):
        path, meta, arrays = ckpt["path"], ckpt["meta"], ckpt["arrays"]
        from tinyllm.model import ModelConfig  # filled in: keys added since read as defaults

        # the device is where the weights live, not what they are: a run resumes on another
        # device, and with --gpus each rank's is its own GPU
        saved = ModelConfig.from_dict(meta["model_config"]).to_dict()
        check_match(path, "model config", saved,
                    dict(self.model.config.to_dict(), device=saved.get("device")))
        fp = data_mod.tokenizer_fingerprint(self.tokenizer)
        if meta["tokenizer_sha256"] != fp:
            raise CheckpointError(f"{path}: tokenizer does not match (checkpoint "
                                  f"{meta['tokenizer_sha256'][:12]}, this run {fp[:12]})")
        saved_ds = meta["dataset"]["key"]
        if saved_ds != self.data_meta["key"]:
            raise CheckpointError(f"{path}: dataset does not match: the checkpoint was trained on "
                                  f"other data (data key {saved_ds[:12]}, now "
                                  f"{self.data_meta['key'][:12]})")
        load_into(self.model, self.optimizer, path, meta, arrays)
        self.step = meta["step"]
        self.best_val = math.inf if meta["best_val"] is None else meta["best_val"]
        backend.set_rng_state(meta["rng"])
        if self.scaler and meta.get("grad_scaler"):
            self.scaler.load_state_dict(meta["grad_scaler"])

    # ---- data parallelism ------------------------------------------------------------------------
    def sum_over_ranks(self, values):
        """The numbers `values` summed over the data-parallel ranks (as they are in one process),
        a float64 NumPy array. A collective: every rank calls it at the same point. Each sum
        also carries every rank's Ctrl-C (see fit), so the ranks agree on when to stop."""
        if not self.dp:
            return np.array(values, dtype=np.float64)
        stop = getattr(self, "_stop", None)
        sums = self.dp.sum(list(values) + [bool(stop and stop["flag"])])
        if stop is not None and sums[-1]:
            stop["agreed"] = True
        return sums[:-1]

    def loss_weights(self, counts, micro):
        """The loss weight of each of this rank's micro-batch shares (x, y) in `micro`, from
        their numbers of counted targets `counts`: the share's part of the whole micro-batch's
        targets over the number of micro-batches, so the weighted losses of all ranks add up
        to the mean over micro-batches of each one's mean loss (1 / grad_accum in one
        process). The whole micro-batch's count is summed over the ranks, unless every target
        counts (then it is batch_size x T, with no exchange)."""
        if self.dp and self.every_target_counts:
            totals = [self.cfg.batch_size * y.shape[1] for _, y in micro]
        else:
            totals = self.sum_over_ranks(counts)
        m = len(counts)
        return [c / t / m if t else 1.0 / m for c, t in zip(counts, totals)]

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self):
        """Mean loss per counted target (targets other than IGNORE_INDEX) over the fixed
        validation batches (each rank takes its rows of every batch)."""
        self.model.eval()
        total, count = 0.0, 0

        def loss_sum(x, y):  # no_grad holds in the thread that enters it: each slice's own
            n = int((y != IGNORE_INDEX).sum())
            if not n:
                return 0.0
            with autograd.no_grad():
                _, loss = self.model(self._dev(x), self._dev(y), return_logits=False)
            return loss.item() * n

        for x, y in self.val_batches():
            rows = data_mod.shard_rows(len(x), self.rank, self.world_size)
            x, y = x[rows], y[rows]
            if not len(x):
                continue
            if self.shards > 1:  # slices of the batch on threads, as in training
                slices = [s for s in zip(np.array_split(x, self.shards),
                                         np.array_split(y, self.shards)) if len(s[0])]
                total += sum(run_slices(loss_sum, slices))
            else:
                total += loss_sum(x, y)
            count += int((y != IGNORE_INDEX).sum())
        self.model.train()
        total, count = self.sum_over_ranks([total, count])
        return float(total / max(count, 1))

    def _dev(self, a):
        return a if self.cfg.device == "cpu" else backend.to_device(a, self.cfg.device)

    # ---- the loop --------------------------------------------------------------------------------
    def logged(self, step):
        """Whether step `step` (counted from 1) gets a log line (and, monitored, its figures)."""
        return (step % self.cfg.log_every == 0 or step == self.cfg.steps
                or (self.monitor is not None and step == 1))

    # ---- the step as a CUDA graph ----------------------------------------------------------------
    def graph_blockers(self):
        """Why this run's step cannot be captured as a CUDA graph (empty: it can). A captured
        step replays fixed kernels on fixed addresses: it cannot read values on the host or
        change shape."""
        cfg, why = self.cfg, []
        if cfg.device == "cpu":
            why.append("CUDA graphs need a GPU")
        if self.scaler is not None:
            why.append("float16 loss scaling decides on the host whether to skip a step")
        if self.dp is not None:
            why.append("data-parallel training exchanges gradients between the ranks")
        if self.monitor is not None:
            why.append("the monitor reads its figures on the host")
        if cfg.checkpoint_blocks:
            why.append("checkpointed blocks recompute under host control")
        if any(p.dtype != np.float32 for p in self.params):
            why.append("the fused optimizer kernel takes float32 parameters only")
        if not fast.enabled():
            why.append("TINYLLM_FUSED=0 turns off the fast paths the captured step runs")
        return why

    def graph_step(self, micro, weights):
        """The step through the captured graph: (loss, grad norm), or None when it cannot be
        captured (the run goes on uncaptured, with a note saying why). Captured at the first
        call, after one uncaptured step has made the optimizer's state and compiled the
        kernels; each call copies this step's batches into the graph's input arrays and
        replays it. The weights change only when the loss and the gradient norm are finite
        (the optimizer kernel checks), as in the uncaptured step."""
        for x, y in micro:  # the checks the ops skip while capturing, on the host
            V = self.model.config.vocab_size
            if x.min() < 0 or x.max() >= V or ((y != IGNORE_INDEX) & ((y < 0) | (y >= V))).any():
                raise IndexError(f"a token id outside 0..{V - 1} in the batch of step "
                                 f"{self.step + 1}")
        if self.step_graph is None or weights != self.graph_weights:
            if self.step_graph is not None:  # the loss weights are baked in: capture again
                self.step_graph = None
            if not self._capture(micro, weights):
                return None
        g = self.step_graph
        g.set_inputs(*[a for xy in micro for a in xy])
        loss_d, norm_sq = g.launch()
        loss, norm = float(loss_d), math.sqrt(float(norm_sq[0]))
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {self.step + 1}")
        if not math.isfinite(norm):
            raise FloatingPointError(f"the gradient norm is {norm} at step {self.step + 1}")
        return loss, norm

    def _capture(self, micro, weights):
        from autograd.fast.cuda import graph
        from autograd.optim import clip_grad_norm_on_device

        cp = backend.cupy_module()
        inputs = [cp.empty(a.shape, np.int64) for xy in micro for a in xy]
        model, params, optimizer, clip = self.model, self.params, self.optimizer, self.cfg.clip

        def step(*arrays):
            total = None
            for k, w in enumerate(weights):
                _, loss = model(arrays[2 * k], arrays[2 * k + 1], return_logits=False)
                if w != 1:
                    loss = loss * w
                loss.backward()
                total = loss.data if total is None else total + loss.data
            norm_sq = clip_grad_norm_on_device(params, 0)  # the norm; AdamW's kernel clips
            optimizer.step(norm_sq=norm_sq + total * 0, max_norm=clip)  # inf/nan when either is
            optimizer.zero_grad()
            return total, norm_sq

        g = graph.StepGraph(step, inputs)
        cp.get_default_memory_pool().free_all_blocks()  # the uncaptured step's cached blocks
        try:
            g.capture()
        except graph.CaptureError as e:
            self.optimizer.zero_grad()  # gradients a failed capture left
            self.use_graph = False
            if self.graph_setting == "on":
                raise RuntimeError(f"cuda_graph on: the step could not be captured: {e}") from e
            log(self.cfg, f"note: the step runs uncaptured (no CUDA graph): capturing it failed: {e}")
            return False
        self.step_graph, self.graph_weights = g, list(weights)
        log(self.cfg, "CUDA graph: the step is captured; each step from here is one replay")
        return True

    def train_step(self):
        cfg = self.cfg
        lr = self.schedule.apply(self.optimizer, self.step)
        first = self.step * cfg.grad_accum
        micro = [self.micro_batch(first + m) for m in range(cfg.grad_accum)]
        counts = [int((y != IGNORE_INDEX).sum()) for _, y in micro]
        self.tokens_seen += sum(x.size for x, _ in micro)
        self.targets_seen = getattr(self, "targets_seen", 0) + sum(counts)
        weights = self.loss_weights(counts, micro)
        if self.use_graph and self.eager_steps >= 1:
            result = self.graph_step(micro, weights)
            if result is not None:
                self.step += 1
                return result[0], lr, result[1]
        micro = [tuple(self._dev(a) for a in xy) for xy in micro]
        watch = self.monitor is not None and self.logged(self.step + 1)
        if watch:
            self.monitor.begin()
        try:
            loss = accumulate_grads(self.model, self.params, micro, self.shards, self.scaler,
                                    weights)
            loss = float(self.sum_over_ranks([loss])[0])
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss} at step {self.step + 1}")
            if watch:
                self.monitor.before_update(self.scaler.scale_value if self.scaler else 1.0)
            try:
                norm = apply_update(self.params, self.optimizer, cfg.clip, self.scaler, self.dp)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} at step {self.step + 1}") from None
        finally:
            if watch:
                self.monitor_figures = self.monitor.end()
        self.step += 1
        self.eager_steps += 1
        return loss, lr, norm

    def _threads_note(self):
        if self.cfg.device != "cpu":
            return ""
        if self.shards > 1:
            return f" (batch split over {self.shards} threads, 1 BLAS thread each)"
        blas = blas_thread_count()
        return f" ({blas} BLAS threads)" if blas else ""

    def _prepare_run_dir(self, metrics_path):
        """The run folder before the first step: no leftovers, config and tokenizer written."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.run_dir.glob(".*.tmp"):  # left by a save that was killed
            tmp.unlink()
        if self.overwrite and self.step == 0:
            for name in RUN_FILES:
                if (self.run_dir / name).exists():
                    (self.run_dir / name).unlink()
        _truncate_metrics(metrics_path, self.step)
        self.tokenizer.save(self.run_dir / "tokenizer.json")
        with atomic_write(self.run_dir / "config.json", "w", encoding="utf-8") as f:
            f.write(json.dumps({"train": self.cfg.to_dict(),
                                "model": self.model.config.to_dict()}, indent=1))

    def fit(self):
        cfg = self.cfg
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.is_main:  # with several ranks, rank 0 alone writes files
            self._prepare_run_dir(metrics_path)
        if self.dp:
            self.dp.broadcast_params()  # the replicas start equal
        n_params = self.model.num_params()
        log(cfg, f"{self.describe_model()}, {n_params / 1e6:.2f}M parameters; "
                 f"vocab {self.tokenizer.vocab_size}; {self.data_summary}")
        where = cfg.device if not self.dp else (
            f"{self.world_size} ranks, each on its share of every batch"
            f"{' (optimizer state sharded: ZeRO-1)' if self.dp.zero1 else ''}")
        log(cfg, f"training {cfg.steps} steps of {self.batch_summary} on "
                 f"{where}{self._threads_note()}; run folder {self.run_dir}"
                 + (f"; resuming at step {self.step}" if self.step else ""))
        # flag: Ctrl-C here; agreed: on some rank, as the last sum over the ranks said
        stop = self._stop = {"flag": False, "agreed": False}

        def stopped():
            return stop["agreed"] if self.dp else stop["flag"]
        diverged = None

        def on_sigint(signum, frame):
            if stop["flag"]:
                raise KeyboardInterrupt
            stop["flag"] = True
            if self.is_main:
                print("\nCtrl-C: finishing this step and saving (press again to quit at once)",
                      file=sys.stderr, flush=True)

        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread
            pass
        t_start = time.perf_counter()
        t_last, step_last = t_start, self.step
        first_step = self.step
        loss_sum = 0.0
        with open(metrics_path if self.is_main else os.devnull, "a") as metrics:
            def record(obj):
                metrics.write(json.dumps(obj) + "\n")
                metrics.flush()

            try:
                while self.step < cfg.steps and not stopped():
                    loss, lr, norm = self.train_step()
                    loss_sum += loss
                    if self.logged(self.step):
                        loss = loss_sum / (self.step - step_last)  # mean since the last line
                        loss_sum = 0.0
                        if self.dp:  # the counts of every rank
                            self.tokens_seen, self.targets_seen, self.padding_seen = \
                                self.sum_over_ranks([self.tokens_seen, self.targets_seen,
                                                     self.padding_seen])
                        now = time.perf_counter()
                        tps = self.tokens_seen / (now - t_last)
                        trained = self.targets_seen / max(self.tokens_seen, 1)
                        padding = self.padding_seen / max(self.tokens_seen, 1)
                        self.tokens_seen = self.targets_seen = self.padding_seen = 0
                        done = self.step - first_step
                        eta = (now - t_start) / done * (cfg.steps - self.step)
                        line = (f"step {self.step:>5}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                                f"grad norm {norm:.3f} | {tps:,.0f} tok/s | ETA {fmt_time(eta)}")
                        rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                               "tokens_per_s": tps, "elapsed_s": now - t_start}
                        if trained < 0.999:  # padding or masked targets (fine-tuning)
                            line += (f" | trained tokens {100 * trained:.0f}%, padding "
                                     f"{100 * padding:.0f}%")
                            rec["trained_share"], rec["padding_share"] = trained, padding
                        if self.peak:
                            mfu = (self.model.flops_per_token(self.block_size) * tps
                                   / (self.peak * self.world_size))
                            line += f" | MFU {100 * mfu:.1f}%"
                            rec["mfu"] = mfu
                        extra = self.log_metrics()
                        rec.update(extra)
                        line += "".join(f" | {k.replace('_', ' ')} {v:.4g}" for k, v in extra.items())
                        if self.monitor_figures is not None:
                            rec["monitor"], fig = self.monitor_figures, self.monitor_figures
                            self.monitor_figures = None
                            if "overflow" in fig:
                                line += (f" | cast overflows {fig['overflow']} underflows "
                                         f"{fig['underflow']} of {fig['cast_values']:,}")
                        log(cfg, line)
                        record(rec)
                        t_last, step_last = now, self.step
                    if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                        t0 = time.perf_counter()
                        val = self.evaluate()
                        if not math.isfinite(val):
                            raise FloatingPointError(f"the validation loss is {val} at step "
                                                     f"{self.step}")
                        best = val < self.best_val
                        if best:
                            self.best_val = val
                        rec = {"step": self.step, "val_loss": val}
                        if self.perplexity:
                            rec["val_ppl"] = math.exp(val)
                        rec.update(self.val_metrics)
                        rec["elapsed_s"] = time.perf_counter() - t_start
                        record(rec)
                        self.save("last.ckpt")
                        if best:
                            self.save("best.ckpt")
                        extra = "".join(f" | {k.replace('_', ' ')} {v:.4g}" for k, v in rec.items()
                                        if k not in ("step", "val_loss", "elapsed_s"))
                        log(cfg, f"step {self.step:>5} | val loss {val:.4f}{extra}"
                                 f"{' | best, saved' if best else ''} "
                                 f"({time.perf_counter() - t0:.1f}s)")
                        t_last += time.perf_counter() - t0  # keep eval time out of tok/s
            except FloatingPointError as e:  # the weights are not saved: the last save is good
                diverged = str(e)
            finally:
                if old_handler is not None:
                    signal.signal(signal.SIGINT, old_handler)
        elapsed = time.perf_counter() - t_start
        if diverged and self.is_main:
            good = [n for n in ("best.ckpt", "last.ckpt") if (self.run_dir / n).exists()]
            print(f"tinyllm {self.command}: stopped: {diverged}; the last good checkpoint is "
                  f"{self.run_dir / good[-1] if good else 'none (no evaluation yet)'}; try a lower "
                  f"learning rate (--lr) or a longer warmup", file=sys.stderr, flush=True)
        elif stopped():
            path = self.save("last.ckpt")  # every rank: under ZeRO-1 a collective
            log(cfg, f"interrupted at step {self.step}; saved {path}; continue with: "
                     f"tinyllm {self.command} --resume {self.run_dir}")
        else:
            log(cfg, f"done: {self.step} steps in {fmt_time(elapsed)} ({elapsed:.1f}s); best val "
                     f"loss {self.best_val:.4f}; checkpoints in {self.run_dir}")
        return {"step": self.step, "best_val": self.best_val, "elapsed_s": elapsed,
                "interrupted": stopped(), "diverged": diverged}

    # ---- sampling ----------------------------------------------------------------------------
    def sample(self, n_tokens, prompt="", temperature=0.8, top_k=40, seed=0):
        return sample_text(self.model, self.tokenizer, n_tokens, prompt, temperature, top_k, seed)


def load_into(model, optimizer, path, meta, arrays):
    """Copy a checkpoint's weights (and optimizer state) into `model` (and `optimizer`)."""
    weights = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    try:
        model.load_state_dict(weights)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit the model: {e}") from None
    if optimizer is not None:
        opt = dict(meta["optimizer"])
        state = {}
        for k, v in arrays.items():
            if k.startswith("optim/"):
                _, i, name = k.split("/", 2)
                state.setdefault(int(i), {})[name] = v
        opt["state"] = state
        opt["groups"] = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g
                         for g in opt["groups"]]
        try:
            optimizer.load_state_dict(opt)
        except ValueError as e:
            raise CheckpointError(f"{path}: optimizer state does not fit: {e}") from None


def _truncate_metrics(path, step):
    """Drop metric records past `step` (left by a run that crashed after its last save)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().split("\n")
            if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in keep))


# ---- sampling ----------------------------------------------------------------------------------

def sample_text(model, tokenizer, n_tokens, prompt="", temperature=0.8, top_k=40, seed=0):
    """Sample `n_tokens` after `prompt` (a fresh document when empty); returns the new text."""
    try:
        from tinyllm.generate import generate as _generate  # the KV-cache sampler, when present
    except ImportError:
        _generate = None
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")
    if _generate is not None:
        model.eval()
        try:
            new = _generate(model, ids, max_new_tokens=n_tokens, temperature=temperature,
                            top_k=top_k, seed=seed)
        finally:
            model.train()
        return tokenizer.decode([t for t in new if t != tokenizer.eot_id])
    return _sample_loop(model, tokenizer, ids, n_tokens, temperature, top_k, seed)


def _sample_loop(model, tokenizer, ids, n_tokens, temperature, top_k, seed):
    """Plain sampling with the model's KV cache: feed the prompt, then one token at a time."""
    rng = np.random.default_rng(seed)
    ctx = model.config.context_length
    ids = list(ids)[-ctx:]
    out = []
    model.eval()
    with autograd.no_grad():
        cache = model.new_cache(1)
        logits, _ = model(np.asarray([ids]), cache=cache, last_only=True)
        for _ in range(n_tokens):
            z = backend.to_device(logits.data[0, -1], "cpu").astype(np.float64)
            if temperature <= 0:
                nxt = int(z.argmax())
            else:
                z = z / temperature
                if top_k:
                    kth = np.sort(z)[-min(top_k, len(z))]
                    z = np.where(z < kth, -np.inf, z)
                p = np.exp(z - z.max())
                nxt = int(rng.choice(len(p), p=p / p.sum()))
            out.append(nxt)
            if cache.length >= ctx:  # context full: start over on the last half
                keep = (ids + out)[-(ctx // 2):]
                cache = model.new_cache(1)
                logits, _ = model(np.asarray([keep]), cache=cache, last_only=True)
            else:
                logits, _ = model(np.asarray([[nxt]]), cache=cache, last_only=True)
    model.train()
    return tokenizer.decode([t for t in out if t != tokenizer.eot_id]) if tokenizer.eot_id \
        is not None else tokenizer.decode(out)


# ---- entry points -----------------------------------------------------------------------------

def train(cfg, resume=None, overwrite=False, group=None, zero1=False):
    """Train per `cfg` (a TrainConfig); `resume`: a run folder or .ckpt file to continue;
    `overwrite`: replace a run already in the output folder; `group`, `zero1`: this process is
    one rank of data-parallel training (see Run). Returns the Run (model, tokenizer, ...) and
    a summary dict."""
    ckpt = None
    if resume is not None:
        path = Path(resume)
        path = path / "last.ckpt" if path.is_dir() else path
        meta, arrays = load_checkpoint(path)
        ckpt = {"path": path, "meta": meta, "arrays": arrays}
    run = Run(cfg, resume_from=ckpt, group=group, zero1=zero1)
    run.overwrite = overwrite
    summary = run.fit()
    return run, summary


def config_from_args(args):
    """Defaults, then --config file, then command-line flags (those given)."""
    settings = {}
    resume_meta = None
    if args.resume:
        path = Path(args.resume)
        path = path / "last.ckpt" if path.is_dir() else path
        resume_meta, _ = load_checkpoint(path)
        if resume_meta.get("kind", "train") != "train":
            raise UsageError(f"--resume {args.resume}: a {resume_meta['kind']} run; resume it with "
                             f"tinyllm {resume_meta['kind']} --resume {args.resume}")
        settings.update(resume_meta["train_config"])
        settings["out"] = str(path.parent)
    if args.config:
        file_settings = read_config_file(args.config)
        settings.update(file_settings)
    cli = {k: v for k, v in vars(args).items()
           if k in {f.name for f in dataclasses.fields(TrainConfig)} and v is not None
           and k != "model"}
    design = {k: getattr(args, k, None) for k in MODEL_FLAGS}
    design = {k: v for k, v in design.items() if v is not None}
    if args.model or design:
        model = dict(settings.get("model", {}))
        for item in args.model or []:
            if "=" not in item:
                raise ValueError(f"--model expects KEY=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            model[k] = _parse_value(v)
        model.update(design)
        cli["model"] = model
    if resume_meta is not None:
        saved = resume_meta["train_config"]
        changed = {k: (saved.get(k), v) for k, v in {**(read_config_file(args.config) if args.config
                                                        else {}), **cli}.items()
                   if k not in RESUMABLE and saved.get(k) != v}
        if changed:
            raise CheckpointError(f"{path}: cannot resume with other settings: " + "; ".join(
                f"{k}: checkpoint has {a!r}, asked for {b!r}" for k, (a, b) in changed.items()))
    settings.update(cli)
    return TrainConfig.from_dict(settings, args.config or "command line")


# Model design choices with a flag of their own (the same as -m KEY=VALUE).
MODEL_FLAGS = ("norm_position", "positions", "init")


def _int_or_auto(v):
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', not {v!r}") from None


def _parse_value(v):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def cmd_train(args):
    from tinyllm import parallel

    cfg = validate_train(config_from_args(args))
    parallel.check(args, cfg.batch_size)
    if not parallel.is_worker(args):  # the launcher checked these before starting workers
        if cfg.init_from and not args.resume and not Path(cfg.init_from).exists():
            raise UsageError(f"--init-from {cfg.init_from}: no such run folder or checkpoint")
        check_run_folder(cfg.out or default_out(cfg), resume=bool(args.resume),
                         overwrite=args.overwrite)
        if args.gpus:
            return parallel.launch(args, "train")
    with parallel.worker(args, cfg, "train") as group:
        run, summary = train(cfg, resume=args.resume, overwrite=args.overwrite, group=group,
                             zero1=args.zero1)
    if summary["diverged"]:
        return 1
    if summary["interrupted"]:
        return 130
    if cfg.sample_tokens and run.is_main:
        t0 = time.perf_counter()
        text = run.sample(cfg.sample_tokens, cfg.prompt, cfg.temperature, cfg.top_k, cfg.seed)
        print(f"\n--- sample ({cfg.sample_tokens} tokens, temperature {cfg.temperature}, "
              f"{time.perf_counter() - t0:.1f}s) ---\n{cfg.prompt}{text}\n---")
    return 0


def register(subparsers):
    from tinyllm.cli import (nonnegative_float, nonnegative_int, positive_float, positive_int,
                             probability)
    from tinyllm.config import INITS, POSITIONS, PRESETS

    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="pretrain a model on a text corpus (default: laptop preset, built-in corpus)",
        description="Pretrain a model. Settings: TrainConfig defaults < --config file < flags. "
                    "Every setting is checked before any work; a folder that holds a run is "
                    "never replaced without --resume or --overwrite.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML or JSON file of settings (training keys at the top, a [model] table "
                        "for the model)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in the output folder (refused otherwise)")
    p.add_argument("--init-from", metavar="RUN_DIR_OR_HF_FOLDER",
                   help="start from these trained weights and their tokenizer (a run folder, "
                        ".ckpt or Hugging Face GPT-2/Llama folder) with new data, schedule and "
                        "optimizer: continued pretraining or fine-tuning")
    p.add_argument("--data", metavar="PATH|NAME",
                   help="'builtin' (Python's help texts), a .txt or .jsonl file (a 'text' field "
                        "per line), a folder of them, or a corpus fetched with tinyllm data get "
                        f"(default {d.data})")
    p.add_argument("--tokenizer", metavar="FILE", help="a saved tokenizer (default: train one on "
                                                         "the data, cached)")
    p.add_argument("--char", action="store_true", default=None,
                   help="byte-level tokenizer, no merges (character level for ASCII)")
    p.add_argument("--vocab-size", type=positive_int,
                   help=f"tokenizer vocabulary to train, >= 256 (default {d.vocab_size})")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="token and tokenizer cache (default $TINYLLM_CACHE or ~/.cache/tinyllm)")
    p.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)} (default {d.preset})")
    p.add_argument("-m", "--model", action="append", metavar="KEY=VALUE",
                   help="model setting override, e.g. -m n_layers=6 -m flavour=gpt2 (repeatable)")
    p.add_argument("--norm-position", choices=["pre", "post"],
                   help="pre-norm x + f(norm(x)) (GPT-2, Llama) or post-norm norm(x + f(x)) "
                        "(the original Transformer, GPT-1) (default: the preset's, pre)")
    p.add_argument("--positions", choices=list(POSITIONS),
                   help="position encoding (default: the preset's)")
    p.add_argument("--init", choices=list(INITS),
                   help="weight initialization: gpt2 (scaled residual projections), normal "
                        "(0.02 everywhere), fan_in (PyTorch's defaults) (default gpt2)")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"sequences per micro-batch (default {d.batch_size})")
    p.add_argument("--block-size", type=positive_int,
                   help="tokens per sequence, at most the context (default: the model's context)")
    p.add_argument("--grad-accum", type=positive_int,
                   help=f"micro-batches per step (default {d.grad_accum})")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--min-lr", type=nonnegative_float,
                   help=f"learning rate at the end of the schedule (default {d.min_lr})")
    p.add_argument("--warmup", type=nonnegative_int, help=f"warmup steps (default {d.warmup})")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"],
                   help=f"learning-rate schedule after warmup (default {d.schedule})")
    p.add_argument("--weight-decay", type=nonnegative_float,
                   help=f"AdamW decoupled weight decay (default {d.weight_decay})")
    p.add_argument("--beta1", type=probability, help=f"AdamW beta1, in [0, 1) (default {d.beta1})")
    p.add_argument("--beta2", type=probability, help=f"AdamW beta2, in [0, 1) (default {d.beta2})")
    p.add_argument("--clip", type=nonnegative_float,
                   help=f"gradient-norm clip, 0 = off (default {d.clip})")
    p.add_argument("--seed", type=int, help=f"seed of weights, batches and dropout (default {d.seed})")
    p.add_argument("--log-every", type=positive_int,
                   help=f"steps between log lines (default {d.log_every})")
    p.add_argument("--eval-every", type=positive_int,
                   help=f"steps between evaluations and checkpoints (default {d.eval_every})")
    p.add_argument("--eval-iters", type=positive_int,
                   help=f"validation batches per evaluation (default {d.eval_iters})")
    p.add_argument("-o", "--out", metavar="DIR", help="run folder (default runs/<preset>)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float64"] + list(PRECISIONS),
                   help="float32 or float64 parameters; or tf32, bfloat16, float16: float32 "
                        "parameters with the matrix products in that precision (float16 with "
                        "loss scaling; GPU modes, emulated and slow on the CPU) (default float32)")
    p.add_argument("--no-loss-scaling", dest="loss_scaling", action="store_false", default=None,
                   help="--dtype float16 without dynamic loss scaling (small gradients then "
                        "underflow to zero; for experiments)")
    p.add_argument("--sample-tokens", type=nonnegative_int,
                   help=f"tokens sampled at the end, 0 = none (default {d.sample_tokens})")
    p.add_argument("--prompt", help="prompt of the final sample (default: a fresh document)")
    p.add_argument("--temperature", type=nonnegative_float,
                   help=f"temperature of the final sample (default {d.temperature})")
    p.add_argument("--top-k", type=nonnegative_int,
                   help=f"top-k of the final sample, 0 = off (default {d.top_k})")
    p.add_argument("--peak-flops", type=positive_float,
                   help="device peak FLOP/s for MFU (default: guessed from the GPU's name)")
    p.add_argument("--threads", type=positive_int,
                   help="BLAS threads on the CPU (default: the library's)")
    p.add_argument("--data-threads", type=_int_or_auto, metavar="N|auto",
                   help="CPU: threads that share each micro-batch, 1 = no split (default auto: "
                        "the usable cores, at most 4)")
    p.add_argument("--checkpoint-blocks", action="store_true", default=None,
                   help="activation checkpointing: recompute each block in backward (less memory)")
    p.add_argument("--monitor", action="store_true", default=None,
                   help="training-health figures per layer (activation RMS, gradient norms, "
                        "update/weight ratios, float16/bfloat16 cast overflows and underflows) "
                        "of each logged step and the first, into metrics.jsonl; draw them with "
                        "tinyllm plot --monitor")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"),
                   help="GPU: capture the training step once as a CUDA graph and replay it (one "
                        "launch a step instead of hundreds); auto: when the run allows it, else "
                        "a note says why not; on: stop with the reason if it cannot; off: never "
                        f"(default {d.cuda_graph})")
    p.add_argument("-q", "--quiet", action="store_true", default=None, help="no log lines")
    from tinyllm import parallel

    parallel.add_arguments(p)
    p.set_defaults(func=cmd_train)
    return p
