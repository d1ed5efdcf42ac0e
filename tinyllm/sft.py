"""Supervised fine-tuning: a base model learns to answer in the chat template.

    tinyllm sft --from runs/laptop                      # the built-in chat tasks, CPU
    tinyllm sft --from runs/laptop --data chats.jsonl   # your own conversations
    tinyllm sft --from runs/laptop --lora-rank 8        # low-rank adapters, base frozen
    tinyllm sft --resume runs/laptop-sft                # continue exactly where it stopped

It is pretraining with two changes, so it runs on `tinyllm train`'s loop (train.Run): config
files, log lines, metrics.jsonl, validation, atomic checkpoints, exact --resume, devices and
dtypes all behave the same.

1. The data are conversations, each rendered by `tinyllm.chat.render` into ids and a loss
   mask. Targets the mask does not train (system and user text, role markers) become -100,
   which the loss ignores: the model learns the assistant's answers and where they end.
2. A row holds one conversation, padded at its end to the longest of the batch (padding
   targets -100 too). Attention is causal, so a token only sees its own conversation: no
   document mask is needed. A batch is drawn from conversations of about the same length
   (buckets of 16 tokens), so little of it is padding. Log lines show the share of the
   batch's tokens that are trained.

The model starts from a run folder (its best.ckpt) or a Hugging Face GPT-2/Llama folder;
`<|im_start|>` and `<|im_end|>` are added to its tokenizer and embedding when missing.
Validation is the mean loss over the assistant tokens of held-out conversations: the built-in
tasks' held-out prompts, or a fixed share of a user's file.
"""

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from autograd import backend
from tinyllm import chat, finetune, parallel
from tinyllm.cli import UsageError
from tinyllm.data import pad_right
from tinyllm.finetune import FinetuneConfig, FinetuneRun
from tinyllm.train import IGNORE_INDEX, log


@dataclass
class SFTConfig(FinetuneConfig):
    command: ClassVar[str] = "sft"
    suffix: ClassVar[str] = "sft"

    n_train: int = 20000  # built-in data: training conversations
    n_val: int = 400  # built-in data: held-out conversations
    steps: int = 1500
    batch_size: int = 32  # conversations per micro-batch
    lr: float = 2e-3
    min_lr: float = 2e-4

    def default_out(self):
        """runs/laptop -> runs/laptop-sft (or -lora)."""
        base = Path(str(self.base).rstrip("/"))
        return str(base.parent / f"{base.name}-{'lora' if self.lora_rank else 'sft'}")


# ---- data ---------------------------------------------------------------------------------------

def builtin_conversations(cfg):
    """(train, held-out) conversations of the built-in chat tasks."""
    from tinyllm import tasks

    # Validation on the verifiable tasks alone: a held-out help topic's sentences cannot be
    # guessed, and their many tokens would swamp the loss on the answers that can.
    verifiable = {name: 1.0 for name in tasks.verifiable_tasks()}
    return (tasks.chat_dataset("train", cfg.n_train, cfg.seed),
            tasks.chat_dataset("heldout", cfg.n_val, cfg.seed, mix=verifiable))


def split_conversations(convs, val_fraction, source="data"):
    """A user's conversations split by the hash of their content (finetune.split_by_hash)."""
    return finetune.split_by_hash(convs, val_fraction, what="conversations", source=source)


def encode_examples(convs, tokenizer, max_len):
    """(x, y) arrays of each conversation that fits `max_len` input positions, and how many
    did not fit (they are left out: cutting one would train on half an answer)."""
    out, too_long = [], 0
    for c in convs:
        x, y = chat.to_example(c, tokenizer)
        if len(x) > max_len:
            too_long += 1
        elif (y != IGNORE_INDEX).any():
            out.append((x, y))
    return out, too_long


def pad_batch(examples, pad_id):
    """Rows padded at their ends to the longest: x with `pad_id`, y with IGNORE_INDEX."""
    return (pad_right([x for x, _ in examples], pad_id),
            pad_right([y for _, y in examples], IGNORE_INDEX))


def examples_key(examples):
    h = hashlib.sha256()
    for x, y in examples:
        h.update(np.asarray(x, "<i8").tobytes())
        h.update(np.asarray(y, "<i8").tobytes())
    return h.hexdigest()


BUCKET = 16  # conversations of a batch differ in length by less than this many tokens


# ---- the run ------------------------------------------------------------------------------------

class SFTRun(FinetuneRun):
    """A fine-tuning run: Run's loop over padded conversation batches."""

    command = "sft"

    def setup(self, resume_from):
        cfg = self.cfg
        self.model, self.tokenizer = self._load_model(resume_from)
        self.block_size = self.model.config.context_length
        if cfg.data == "builtin":
            train, val = builtin_conversations(cfg)
            source = "built-in chat tasks"
        else:
            convs = chat.read_conversations(cfg.data)
            train, val = split_conversations(convs, cfg.val_fraction, cfg.data)
            source = str(cfg.data)
        self.train_examples, long_train = encode_examples(train, self.tokenizer, self.block_size)
        self.val_examples, long_val = encode_examples(val, self.tokenizer, self.block_size)
        if long_train + long_val:
            log(cfg, f"note: left out {long_train + long_val} conversations longer than the "
                     f"context ({self.block_size} tokens)")
        if not self.train_examples or not self.val_examples:
            raise UsageError(f"{source}: no conversation fits the model's context of "
                             f"{self.block_size} tokens (or none has an assistant turn)")
        key = examples_key(self.train_examples + self.val_examples)  # eval_iters may change
        self.val_examples = self.val_examples[:cfg.eval_iters * cfg.batch_size]
        self._make_buckets()
        self.pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        n_tok = sum(len(x) for x, _ in self.train_examples)
        n_trained = sum(int((y != IGNORE_INDEX).sum()) for _, y in self.train_examples)
        self.data_meta = {"key": key,
                          "train_tokens": n_tok, "val_tokens": sum(len(x) for x, _ in self.val_examples)}
        self.data_summary = (f"data: {source}, {len(self.train_examples):,} train / "
                             f"{len(self.val_examples):,} held-out conversations, "
                             f"{n_tok / len(self.train_examples):.0f} tokens each on average, "
                             f"{100 * n_trained / n_tok:.0f}% of them trained")
        self.batch_summary = (f"{cfg.batch_size} conversations"
                              f"{f' x {cfg.grad_accum} micro-batches' if cfg.grad_accum > 1 else ''}"
                              f" (padded to the longest)")

    def _load_model(self, resume_from):
        model, tokenizer = self.starting_model(resume_from)
        self.token_rows = None
        if self.cfg.lora_rank:
            self.apply_lora(model)
            self._train_chat_rows(model, tokenizer)
        return model, tokenizer

    def _train_chat_rows(self, model, tokenizer):
        """Under LoRA the embedding rows of the chat tokens train too (PEFT's "trainable
        tokens"): they start as the mean row, and a frozen tied head could never make
        <|im_end|> likelier than the average token, so the model could not learn to stop.
        The embedding takes gradients, and after each step every other row is put back."""
        self.token_rows = [tokenizer.special_tokens[t] for t in chat.CHAT_TOKENS]
        self.row_tables = [model.tok_emb] + ([model.lm_head] if model.lm_head is not None else [])
        keep = np.ones(model.config.vocab_size, bool)
        keep[self.token_rows] = False
        self.frozen_rows = backend.to_device(keep, model.tok_emb.weight.device)
        for layer in self.row_tables:
            layer.weight.requires_grad = True
        self.saved_rows = None  # taken at the first step: after a resume has loaded the weights

    def train_step(self):
        if self.token_rows is not None and self.saved_rows is None:
            self.saved_rows = [layer.weight.data[self.frozen_rows].copy()
                               for layer in self.row_tables]
        out = super().train_step()
        if self.token_rows is not None:
            for layer, rows in zip(self.row_tables, self.saved_rows):
                layer.weight.data[self.frozen_rows] = rows
        return out

    def chat_rows(self):
        """The trained embedding rows of the chat tokens (LoRA runs), JSON-able."""
        return {"ids": self.token_rows,
                "tables": [backend.to_device(layer.weight.data[self.token_rows], "cpu")
                           .astype(np.float64).tolist() for layer in self.row_tables]}

    def micro_batch(self, k):
        """B conversations of one length bucket, drawn by a generator seeded with (seed, k):
        a pure function of k. The bucket is drawn with probability proportional to its size,
        so every conversation is as likely as in a plain draw; within a bucket lengths differ
        by less than BUCKET tokens, so padding stays small."""
        B = self.cfg.batch_size
        rng = np.random.default_rng([self.cfg.seed, k])
        bucket = self.buckets[rng.choice(len(self.buckets), p=self.bucket_p)]
        idx = rng.choice(bucket, size=B, replace=len(bucket) < B)[self.rows]  # this rank's
        x, y = pad_batch([self.train_examples[i] for i in idx], self.pad_id)
        self.padding_seen += x.size - sum(len(self.train_examples[i][0]) for i in idx)
        return x, y

    def _make_buckets(self):
        lengths = np.array([len(x) for x, _ in self.train_examples])
        keys = lengths // BUCKET
        self.buckets = [np.flatnonzero(keys == b) for b in np.unique(keys)]
        self.bucket_p = np.array([len(b) for b in self.buckets], float) / len(lengths)

    def val_batches(self):
        B = self.cfg.batch_size
        for i in range(0, len(self.val_examples), B):
            yield pad_batch(self.val_examples[i:i + B], self.pad_id)

    def adapter_meta(self):
        return {**super().adapter_meta(), "chat_rows": self.chat_rows()}


# ---- command line -------------------------------------------------------------------------------

def cmd_sft(args):
    cfg = finetune.config_from_args(args, SFTConfig)
    if cfg.data != "builtin":
        chat.read_conversations(cfg.data)  # every line checked before any work
    run, code = finetune.start(args, cfg, SFTRun)
    if code == 0 and not cfg.quiet and run is not None and run.is_main:
        show_samples(run)
    return code


def show_samples(run, n=3):
    """A few held-out prompts and the model's greedy answers."""
    from tinyllm.generate import generate

    tok, model = run.tokenizer, run.model
    print("\n--- held-out samples (greedy) ---")
    for x, y in run.val_examples[:n]:
        first = int(np.argmax(y != IGNORE_INDEX))  # the prompt ends where training starts
        t0 = time.perf_counter()
        new = generate(model, list(x[:first + 1]), max_new_tokens=48, temperature=0,
                       stop_tokens=[chat.end_of_turn(tok)])
        prompt = tok.decode([t for t in x[:first + 1] if t not in tok.inverse_special_tokens])
        print(f"{prompt.strip()!r} -> {tok.decode(new)!r} ({time.perf_counter() - t0:.2f}s)")
    print("---")


def register(subparsers):
    d = SFTConfig()
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning: teach a base model the chat template",
        description="Fine-tune a model on conversations (loss on the assistant's tokens only). "
                    "Settings: SFTConfig defaults < --config file < flags.")
    finetune.add_arguments(p, d, "conversations",
                           "a JSON-lines file of conversations, one per line, in any of: "
                           + "; ".join(chat.FORMATS.values()) + ", or builtin: the built-in tasks")
    parallel.add_arguments(p)
    p.set_defaults(func=cmd_sft)
    return p


# ---- merge-lora -----------------------------------------------------------------------------------

def merge_adapters(base, adapter, tokenizer=None, device="cpu"):
    """(model, tokenizer): the base model with the chat tokens (rows at the mean, as the
    fine-tuning run started) and the adapters of `adapter` folded into its weights."""
    from tinyllm.generate import load_for_generation
    from tinyllm.lora import load_adapters_into, merge_lora

    model, tok = load_for_generation(base, tokenizer=tokenizer, device=device, dtype="float32")
    model, tok = chat.prepare_for_chat(model, tok)
    extra = load_adapters_into(model, adapter)
    rows = extra.get("chat_rows")
    if rows:  # the chat tokens' embedding rows trained beside the adapters
        tables = [model.tok_emb] + ([model.lm_head] if model.lm_head is not None else [])
        for layer, values in zip(tables, rows["tables"]):
            layer.weight.data[rows["ids"]] = backend.to_device(
                np.asarray(values, layer.weight.dtype), layer.weight.device)
    return merge_lora(model), tok


def cmd_merge_lora(args):
    from tinyllm.generate import save_for_generation
    from tinyllm.lora import load_adapters

    run = Path(args.run_dir)
    adapter = Path(args.adapter) if args.adapter else run / "adapter.safetensors"
    if not adapter.is_file():
        raise UsageError(f"{adapter}: no adapter file (a LoRA fine-tuning run writes "
                         f"adapter.safetensors in its folder; or pass --adapter FILE)")
    _, extra, _ = load_adapters(adapter)
    base = args.base or extra.get("base")
    if not base or not Path(base).exists():
        raise UsageError(f"--base: the base model {base!r} of {adapter} is not there; pass "
                         f"--base RUN_DIR_OR_HF_FOLDER")
    out = Path(args.out or f"{str(run).rstrip('/')}-merged")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out}: the folder exists and is not empty (pass --overwrite)")
    model, tok = merge_adapters(base, adapter, tokenizer=args.tokenizer)
    save_for_generation(out, model, tok, {"kind": "merged-lora", "base": str(base),
                                          "adapter": str(adapter)})
    print(f"merged {adapter} into {base} -> {out}")
    return 0


def register_merge(subparsers):
    p = subparsers.add_parser(
        "merge-lora", help="fold a LoRA run's adapters into its base model's weights",
        description="Write a run folder whose weights are W + (alpha / r) B A: the same "
                    "logits as the base model with the adapters, without them.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a LoRA fine-tuning run folder")
    p.add_argument("--adapter", help="adapter file (default RUN_DIR/adapter.safetensors)")
    p.add_argument("--base", help="the base model (default: the one the run started from)")
    p.add_argument("--tokenizer", help="tokenizer for a Hugging Face base without one")
    p.add_argument("-o", "--out", help="output run folder (default RUN_DIR-merged)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_merge_lora)
    return p
