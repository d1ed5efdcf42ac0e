"""What every fine-tuning command shares: its settings, its flags, and how it starts or resumes.

`tinyllm sft`, `tinyllm dpo` and `tinyllm reward train` each start from a trained model and run
on `tinyllm.train.Run`'s loop. Their settings have one base, FinetuneConfig: the model to start
from, the data, LoRA, and the loop's optimization and bookkeeping. A command's own config
subclasses it, adds its settings and sets its defaults (a field declared again keeps its place
and takes the new default). Settings come in layers, as for `tinyllm train`: the defaults, then
a --config file, then flags; a resumed run starts from the checkpoint's settings and refuses
changes to any that would change what a step computes.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tinyllm import chat
from tinyllm.checkpoint import CheckpointError, load_checkpoint
from tinyllm.cli import (UsageError, check_float, check_int, nonnegative_float, nonnegative_int,
                         positive_float, positive_int, probability)
from tinyllm.train import (Run, _int_or_auto, check_run_folder, log, param_dtype,
                           read_config_file, validate_common)

# Settings that may change when resuming (they do not change what a step computes).
RESUMABLE = {"steps", "log_every", "eval_every", "eval_iters", "out", "peak_flops", "quiet",
             "device", "threads", "data_threads", "checkpoint_blocks"}

LORA_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@dataclass
class FinetuneConfig:
    command: ClassVar[str] = "finetune"  # the subcommand, and the checkpoint's "kind"
    suffix: ClassVar[str] = "ft"  # default output: the --from folder's name + "-" + suffix

    base: str | None = None  # the model to start from: run folder, .ckpt or HF folder (--from)
    tokenizer: str | None = None  # for a Hugging Face folder without tokenizer files
    data: str = "builtin"  # "builtin" (generated from tinyllm.tasks) or a .jsonl file
    n_train: int = 4000  # built-in data: training examples
    n_val: int = 400  # built-in data: held-out examples
    val_fraction: float = 0.05  # a user's file: share held out (chosen by content hash)
    # low-rank adapters: rank 0 trains every weight
    lora_rank: int = 0
    lora_alpha: float | None = None  # None: 2 * rank
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    # optimization (as TrainConfig)
    steps: int = 600
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    clip: float = 1.0
    # bookkeeping (as TrainConfig)
    seed: int = 1337
    log_every: int = 20
    eval_every: int = 100
    eval_iters: int = 25  # held-out batches per evaluation (at most)
    out: str | None = None  # run folder; None: next to --from, with the command's suffix
    device: str = "cpu"
    dtype: str = "float32"
    peak_flops: float | None = None
    threads: int | None = None
    data_threads: int | str = "auto"
    checkpoint_blocks: bool = False
    quiet: bool = False

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, source="config"):
        if not isinstance(d, dict):
            raise UsageError(f"{source}: must hold a table of settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"{source}: unknown {cls.command} settings {unknown}; known: "
                             f"{', '.join(sorted(known))}")
        return cls(**d)

    def validate(self):
        """Every shared setting, one UsageError naming the first bad one; subclasses check
        their own after calling this."""
        validate_common(self)
        check_int("n_train", self.n_train, low=1)
        check_int("n_val", self.n_val, low=1)
        check_float("val_fraction", self.val_fraction, low=0, high=1, low_open=True, high_open=True)
        check_int("lora_rank", self.lora_rank, low=0)
        check_float("lora_alpha", self.lora_alpha, low=0, low_open=True, allow_none=True)
        if self.lora_rank:
            from tinyllm.lora import LoRAConfig

            try:
                LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_targets)
            except ValueError as e:
                raise UsageError(f"lora_targets: {e}") from None
        if not self.base:
            raise UsageError("--from: give the run folder (or Hugging Face folder) to start from")
        if not isinstance(self.data, str) or not self.data:
            raise UsageError(f"data: must be 'builtin' or a .jsonl file, got {self.data!r}")
        if self.data != "builtin" and not Path(self.data).is_file():
            raise UsageError(f"--data {self.data}: no such file (or 'builtin')")
        return self

    def default_out(self):
        """runs/laptop -> runs/laptop-<suffix>."""
        base = Path(str(self.base).rstrip("/"))
        return str(base.parent / f"{base.name}-{self.suffix}")


# ---- data ---------------------------------------------------------------------------------------

def split_by_hash(items, val_fraction, record=lambda item: item, what="examples", source="data"):
    """(train, held-out) of a user's examples, split by the SHA-256 of each one's JSON
    `record`: an example always lands on the same side whatever the file's order, and at least
    one is held out (and one trains)."""
    if len(items) < 2:
        raise UsageError(f"{source}: need at least 2 {what} to hold some out, got {len(items)}")

    def bucket(item):
        text = json.dumps(record(item), sort_keys=True)
        return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") / 2 ** 64

    share = [bucket(item) for item in items]
    val = [item for item, b in zip(items, share) if b < val_fraction]
    train = [item for item, b in zip(items, share) if b >= val_fraction]
    if not val:
        val, train = train[-1:], train[:-1]
    if not train:
        val, train = val[-1:], val[:-1]
    return train, val


# ---- starting and resuming ----------------------------------------------------------------------

def checkpoint_path(resume):
    """The checkpoint a --resume argument names: RUN_DIR/last.ckpt, or the file itself."""
    path = Path(resume)
    path = path / "last.ckpt" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--resume {resume}: no checkpoint there")
    return path


def config_from_args(args, cls):
    """A `cls` config from defaults < --config file < flags; on --resume the checkpoint's
    settings first, and only RESUMABLE ones may change."""
    settings, saved, path = {}, None, None
    if args.resume:
        path = checkpoint_path(args.resume)
        meta, _ = load_checkpoint(path)
        if meta.get("kind", "train") != cls.command:
            raise UsageError(f"--resume {args.resume}: not a {cls.command} run (resume it with "
                             f"tinyllm {meta.get('kind') or 'train'} --resume)")
        saved = meta["train_config"]
        settings.update(saved)
        settings["out"] = str(path.parent)
    if args.config and not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file")
    file_settings = read_config_file(args.config) if args.config else {}
    if not isinstance(file_settings, dict):
        raise UsageError(f"--config {args.config}: must hold a table of settings")
    settings.update(file_settings)
    names = {f.name for f in dataclasses.fields(cls)}
    cli = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if saved is not None:
        changed = {k: (saved.get(k), v) for k, v in {**file_settings, **cli}.items()
                   if k not in getattr(cls, "resumable", RESUMABLE) and saved.get(k) != v}
        if changed:
            raise CheckpointError(f"{path}: cannot resume with other settings: " + "; ".join(
                f"{k}: checkpoint has {a!r}, asked for {b!r}" for k, (a, b) in changed.items()))
    settings.update(cli)
    return cls.from_dict(settings, args.config or "command line").validate()


def start(args, cfg, run_cls):
    """Check the output folder and the starting model, build the run (resumed or fresh), fit
    it; returns the Run and the exit code (1 diverged, 130 interrupted, else 0). With --gpus N
    this process starts N workers that each do so (tinyllm.parallel); it returns no Run then."""
    from tinyllm import parallel

    parallel.check(args, cfg.batch_size)
    out = Path(cfg.out or cfg.default_out())
    if not parallel.is_worker(args):  # the launcher checked these before starting workers
        if not args.resume:
            if not Path(cfg.base).exists():
                raise UsageError(f"--from {cfg.base}: no such run folder or checkpoint")
            base = Path(cfg.base).resolve()
            if out.resolve() == base or out.resolve() in base.parents:
                raise UsageError(f"--out {out}: that folder holds the model to start from "
                                 f"({cfg.base}); choose another")
        check_run_folder(out, resume=bool(args.resume), overwrite=args.overwrite)
        if getattr(args, "gpus", None):
            return None, parallel.launch(args, cfg.command)
    ckpt = None
    if args.resume:
        path = checkpoint_path(args.resume)
        meta, arrays = load_checkpoint(path)
        ckpt = {"path": path, "meta": meta, "arrays": arrays}
    cfg.out = str(out)
    with parallel.worker(args, cfg, cfg.command) as group:
        ranks = {"group": group, "zero1": args.zero1} if group is not None else {}
        run = run_cls(cfg, resume_from=ckpt, **ranks)
        run.overwrite = args.overwrite
        summary = run.fit()
    return run, 1 if summary["diverged"] else 130 if summary["interrupted"] else 0


# ---- flags ----------------------------------------------------------------------------------------

def add_arguments(p, d, unit, data_help):
    """The flags every fine-tuning command has, with `d`'s defaults in their help. `unit`:
    what a batch holds ("conversations", "pairs"); `data_help`: what --data accepts."""
    add_start_arguments(p, d)
    p.add_argument("--data", metavar="FILE.jsonl|builtin", help=f"{data_help} (default {d.data})")
    p.add_argument("--n-train", type=positive_int, help=f"built-in training {unit} ({d.n_train})")
    p.add_argument("--n-val", type=positive_int, help=f"built-in held-out {unit} ({d.n_val})")
    p.add_argument("--val-fraction", type=probability,
                   help=f"share of a --data file held out ({d.val_fraction})")
    add_lora_arguments(p, d)
    p.add_argument("--batch-size", type=positive_int, help=f"{unit} per micro-batch ({d.batch_size})")
    p.add_argument("--grad-accum", type=positive_int, help=f"micro-batches per step ({d.grad_accum})")
    add_loop_arguments(p, d)
    p.add_argument("--eval-iters", type=positive_int,
                   help=f"held-out batches per evaluation, at most ({d.eval_iters})")
    add_device_arguments(p)


def add_start_arguments(p, d):
    """Where a run starts from and where it goes: --from, --config, --resume, --out..."""
    p.add_argument("--from", dest="base", metavar="RUN_DIR_OR_HF_FOLDER",
                   help="the model to start from: a tinyllm run folder or .ckpt, or a Hugging "
                        "Face GPT-2/Llama folder (the chat tokens are added when missing)")
    p.add_argument("--tokenizer", help="tokenizer for a Hugging Face folder without one")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this folder exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in the output folder (refused otherwise)")
    p.add_argument("-o", "--out", metavar="DIR",
                   help=f"run folder (default: next to --from, with -{d.suffix})")


def add_lora_arguments(p, d):
    p.add_argument("--lora-rank", type=nonnegative_int, help="train rank-R adapters beside frozen "
                   "weights (default 0: every weight trains)")
    p.add_argument("--lora-alpha", type=positive_float,
                   help="adapter scale numerator: the update is (alpha / rank) B A (default 2 x rank)")
    p.add_argument("--lora-targets", type=lambda s: s.split(","), metavar="NAMES",
                   help=f"comma-separated projections to adapt ({','.join(d.lora_targets)})")


def add_loop_arguments(p, d):
    """The optimizer, its schedule, the seed and the loop's bookkeeping."""
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps ({d.steps})")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate ({d.lr})")
    p.add_argument("--min-lr", type=nonnegative_float, help=f"final learning rate ({d.min_lr})")
    p.add_argument("--warmup", type=nonnegative_int, help=f"warmup steps ({d.warmup})")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], help=f"({d.schedule})")
    p.add_argument("--weight-decay", type=nonnegative_float, help=f"AdamW decay ({d.weight_decay})")
    p.add_argument("--clip", type=nonnegative_float, help=f"gradient-norm clip, 0 = off ({d.clip})")
    p.add_argument("--seed", type=int, help=f"seed of the data order, sampling and new weights "
                                            f"({d.seed})")
    p.add_argument("--log-every", type=positive_int, help=f"steps between log lines ({d.log_every})")
    p.add_argument("--eval-every", type=positive_int,
                   help=f"steps between evaluations and checkpoints ({d.eval_every})")


def add_device_arguments(p):
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", help="float32, float64, tf32, bfloat16 or float16 (default float32)")
    p.add_argument("--threads", type=positive_int, help="BLAS threads on the CPU")
    p.add_argument("--data-threads", type=_int_or_auto, metavar="N|auto",
                   help="CPU: threads that share each micro-batch (default auto)")
    p.add_argument("--checkpoint-blocks", action="store_true", default=None,
                   help="activation checkpointing: recompute each block in backward")
    p.add_argument("-q", "--quiet", action="store_true", default=None, help="no log lines")


# ---- the run ------------------------------------------------------------------------------------

class FinetuneRun(Run):
    """Run's loop for a run that starts from a trained model: the model comes from --from (with
    the chat tokens added when missing) or, on --resume, is shaped as the checkpoint says (its
    weights are loaded later by Run); LoRA wraps it when asked."""

    verb = "fine-tuning"  # how describe_model names the job
    every_target_counts = False  # chat data masks the prompts' targets
    expects_chat_model = False  # True: say so when --from has no chat tokens (not an SFT model)

    def default_out(self):
        return self.cfg.default_out()

    def starting_model(self, resume_from):
        """(model, tokenizer) before LoRA: the checkpoint's shapes and tokenizer when resuming,
        else the --from model with the chat tokens."""
        from tinyllm.generate import load_for_generation
        from tinyllm.model import GPT, ModelConfig
        from tinyllm.tokenizer import Tokenizer

        cfg = self.cfg
        dtype = param_dtype(cfg.dtype)
        if resume_from is not None:
            meta = resume_from["meta"]
            model = GPT(ModelConfig.from_dict(dict(meta["model_config"], device=cfg.device,
                                                   dtype=dtype)))
            tokenizer = Tokenizer.from_json(meta["tokenizer"], source=str(resume_from["path"]))
            return model, tokenizer
        model, tokenizer = load_for_generation(cfg.base, tokenizer=cfg.tokenizer,
                                               device=cfg.device, dtype=dtype)
        if self.expects_chat_model and not chat.has_chat_tokens(tokenizer):
            log(cfg, f"note: {cfg.base} has no chat tokens (not a fine-tuned chat model); they "
                     f"are added now, untrained: {cfg.command} usually starts from tinyllm sft")
        return chat.prepare_for_chat(model, tokenizer)

    def apply_lora(self, model):
        """Wrap `model`'s projections with the configured adapters (when lora_rank > 0)."""
        cfg = self.cfg
        if cfg.lora_rank:
            from tinyllm.lora import LoRAConfig, apply_lora

            apply_lora(model, LoRAConfig(cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank,
                                         tuple(cfg.lora_targets)))
        return model

    def describe_model(self):
        c = self.model.config
        lora = ""
        if self.cfg.lora_rank:
            n = sum(p.size for p in self.model.parameters() if p.requires_grad)
            lora = f", LoRA rank {self.cfg.lora_rank}: {n / 1e3:.1f}k trained parameters"
        return f"{self.verb} {self.cfg.base} ({c.n_layers} layers, d_model {c.d_model}{lora})"

    def adapter_meta(self):
        """What an adapter file records beside the adapters (a kind of run adds its own)."""
        return {"base": str(self.cfg.base), "step": self.step}

    def save(self, name):
        """Run's checkpoint; with LoRA, best.ckpt's adapters also go to adapter.safetensors."""
        path = super().save(name)
        if path is not None and name == "best.ckpt" and getattr(self.model, "lora", None) is not None:
            from tinyllm.lora import save_adapters

            save_adapters(self.run_dir / "adapter.safetensors", self.model, self.adapter_meta())
        return path

    def extra_meta(self):
        meta = {"kind": self.cfg.command}
        lora = getattr(self.model, "lora", None)
        if lora is not None:
            meta["lora"] = lora.to_dict()
        return meta
