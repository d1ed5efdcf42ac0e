"""Direct Preference Optimization: a chat model learns to prefer chosen replies to rejected ones.

    tinyllm dpo --from runs/laptop-sft                       # the built-in preference pairs
    tinyllm dpo --from runs/laptop-sft --data pairs.jsonl    # your own pairs
    tinyllm dpo --from runs/laptop-sft --lora-rank 8         # low-rank adapters, base frozen
    tinyllm dpo --resume runs/laptop-sft-dpo                 # continue exactly where it stopped

It runs on `tinyllm train`'s loop (train.Run), as `tinyllm sft` does: config files, log lines,
metrics.jsonl, checkpoints, exact --resume, devices, dtypes and LoRA behave the same. What
differs is the step: each batch of pairs goes through the model once (chosen and rejected
replies in one padded batch), and the loss is DPO's (`tinyllm.posttrain.dpo_loss`) instead of
next-token cross-entropy, plus by default the chosen replies' per-token negative
log-likelihood (`--rpo-alpha`, as TRL's rpo_alpha): without it the tiny models here learn to
make the rejected replies unlikely by making every reply less likely, and answer worse.

The reference model is the starting model, frozen. It is never needed again after its
log-probabilities of every training and held-out pair are computed, once, before training:
they are kept in the run folder (reference_logps.npz, with a fingerprint of the data and of
the starting model) and reused on --resume, so training holds one model in memory.

Log lines and metrics.jsonl carry TRL's metrics: rewards/chosen, rewards/rejected,
rewards/margins and rewards/accuracies (means over the pairs since the last line), and the
same on the held-out pairs at each evaluation (val_ prefixed). The validation loss is the
held-out DPO loss; best.ckpt is the lowest one.
"""

import hashlib
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

import autograd
from autograd import backend
from tinyllm import chat, finetune, parallel, posttrain, preference
from tinyllm.atomic import atomic_write
from tinyllm.checkpoint import CheckpointError
from tinyllm.cli import UsageError, check_choice, check_float, nonnegative_float, positive_float
from tinyllm.finetune import FinetuneConfig, FinetuneRun
from tinyllm.train import apply_update, log, param_dtype, run_slices, shard_count

REFERENCE_FILE = "reference_logps.npz"


@dataclass
class DPOConfig(FinetuneConfig):
    command: ClassVar[str] = "dpo"
    suffix: ClassVar[str] = "dpo"

    n_train: int = 4000  # built-in data: training pairs
    n_val: int = 400  # built-in data: held-out pairs
    # the objective
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0
    # weight of the chosen replies' per-token negative log-likelihood added to each pair's
    # loss (RPO, TRL's rpo_alpha). Plain DPO (0) lowers the chosen replies' likelihood along
    # with the rejected ones', and a small model's greedy answers got worse for it (measured
    # on the built-in tasks); the NLL term keeps the chosen replies likely.
    rpo_alpha: float = 1.0
    steps: int = 200
    batch_size: int = 32  # pairs per micro-batch (twice as many sequences)
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup: int = 10
    log_every: int = 10
    eval_every: int = 50

    def validate(self):
        super().validate()
        check_float("beta", self.beta, low=0, low_open=True)
        check_choice("loss", self.loss, posttrain.LOSS_TYPES)
        check_float("label_smoothing", self.label_smoothing, low=0, high=0.5, high_open=True)
        if self.label_smoothing and self.loss != "sigmoid":
            raise UsageError(f"label_smoothing: is for the sigmoid loss, not {self.loss!r} "
                             f"(got {self.label_smoothing!r})")
        check_float("rpo_alpha", self.rpo_alpha, low=0)
        return self



# ---- data ---------------------------------------------------------------------------------------

def split_pairs(pairs, val_fraction, source="data"):
    """A user's pairs split by the hash of their content (finetune.split_by_hash)."""
    from tinyllm.preference import pair_record

    return finetune.split_by_hash(pairs, val_fraction, pair_record, "preference pairs", source)


def encode_pairs(pairs, tokenizer, max_len):
    """Encoded pairs (`posttrain.encode_pair`) whose replies fit `max_len` + 1 tokens (the
    model reads all but the last), and how many did not (left out: a cut reply would be
    scored on half of it)."""
    out, too_long = [], 0
    for p in pairs:
        (c, cm), (r, rm) = enc = posttrain.encode_pair(p, tokenizer)
        if max(len(c), len(r)) > max_len + 1:
            too_long += 1
        else:
            out.append(enc)
    return out, too_long


def encoded_key(encoded):
    """SHA-256 of the encoded pairs: ids and completion masks of every reply, in order."""
    h = hashlib.sha256()
    for pair in encoded:
        for ids, mask in pair:
            h.update(np.asarray(ids, "<i8").tobytes())
            h.update(np.packbits(mask).tobytes())
            h.update(len(ids).to_bytes(8, "little"))
    return h.hexdigest()


def model_fingerprint(model, dtype):
    """SHA-256 of a model's weights (in name order) and the precision it computes in: two
    models with the same fingerprint give the same log-probabilities."""
    h = hashlib.sha256(str(dtype).encode())
    for name, value in sorted(model.state_dict().items()):
        a = np.ascontiguousarray(backend.to_device(value, "cpu"))
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---- the reference: log-probabilities of the starting model, computed once -------------------

def reference_logprobs(model, encoded, batch_size, pad_id, threads=1):
    """(N, 2) float64 array: the model's (chosen, rejected) log-probabilities of every encoded
    pair, without gradients. Batches of `batch_size` pairs of about the same length (little
    padding); on the CPU, `threads` batches run at once, as training's slices do."""
    out = np.empty((len(encoded), 2), np.float64)
    order = np.argsort([max(len(c), len(r)) for (c, _), (r, _) in encoded], kind="stable")
    batches = [(order[i:i + batch_size],) for i in range(0, len(order), batch_size)]

    def logps(idx):
        with autograd.no_grad():  # per thread: no_grad holds in the thread that enters it
            c, r = posttrain.pair_logprobs(model, [encoded[i] for i in idx], pad_id)
        return idx, backend.to_device(c.data, "cpu"), backend.to_device(r.data, "cpu")

    training = model.training
    model.eval()
    try:
        for k in range(0, len(batches), threads):
            group = batches[k:k + threads]
            for idx, c, r in (run_slices(logps, group) if len(group) > 1 else [logps(*group[0])]):
                out[idx, 0], out[idx, 1] = c, r
    finally:
        model.train(training)
    return out


def save_reference(path, fingerprint, train_logps, val_logps):
    """The reference log-probabilities and what they are of, written all at once."""
    with atomic_write(path) as f:
        np.savez(f, fingerprint=np.array(fingerprint), train=train_logps, val=val_logps)


def load_reference(path, fingerprint):
    """(train, val) log-probabilities of a reference file made for `fingerprint`, or None
    when there is none or it was made for other data or another starting model."""
    try:
        with np.load(path) as f:
            if str(f["fingerprint"]) != fingerprint:
                return None
            return f["train"], f["val"]
    except (OSError, KeyError, ValueError):
        return None


# ---- the run ------------------------------------------------------------------------------------

def _means(sums, prefix):
    """{prefix + "rewards/...": mean over the pairs} of metric sums."""
    n = sums.get("pairs", 0)
    return {prefix + k: v / n for k, v in sums.items() if k.startswith("rewards/")} if n else {}


class DPORun(FinetuneRun):
    """A DPO run: Run's loop with the DPO step and evaluation."""

    command = "dpo"
    verb = "DPO from"
    perplexity = False  # the validation loss is the DPO loss, not a cross-entropy
    expects_chat_model = True

    def setup(self, resume_from):
        cfg = self.cfg
        self.model, self.tokenizer, start = self._load_model(resume_from)
        self.block_size = self.model.config.context_length
        if cfg.data == "builtin":
            train = preference.builtin_pairs("train", cfg.n_train, cfg.seed)
            val = preference.builtin_pairs("heldout", cfg.n_val, cfg.seed)
            source = "built-in preference pairs"
        else:
            train, val = split_pairs(preference.read_pairs(cfg.data), cfg.val_fraction, cfg.data)
            source = str(cfg.data)
        self.train_pairs, long_train = encode_pairs(train, self.tokenizer, self.block_size)
        self.val_pairs, long_val = encode_pairs(val, self.tokenizer, self.block_size)
        if long_train + long_val:
            log(cfg, f"note: left out {long_train + long_val} pairs longer than the context "
                     f"({self.block_size} tokens)")
        if not self.train_pairs or not self.val_pairs:
            raise UsageError(f"{source}: no preference pair fits the model's context of "
                             f"{self.block_size} tokens")
        self.val_pairs = self.val_pairs[:cfg.eval_iters * cfg.batch_size]
        self.pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        self.data_meta = {"key": encoded_key(self.train_pairs + self.val_pairs),
                          "train_pairs": len(self.train_pairs), "val_pairs": len(self.val_pairs)}
        self._lengths()
        self._reference(start, resume_from)
        self.stats = {}  # training metrics summed since the last log line
        n_tok = sum(len(c) + len(r) for (c, _), (r, _) in self.train_pairs)
        self.data_summary = (f"data: {source}, {len(self.train_pairs):,} train / "
                             f"{len(self.val_pairs):,} held-out pairs, "
                             f"{n_tok / len(self.train_pairs) / 2:.0f} tokens per prompt + "
                             f"reply on average")
        self.batch_summary = (f"{cfg.batch_size} pairs"
                              f"{f' x {cfg.grad_accum} micro-batches' if cfg.grad_accum > 1 else ''}"
                              f" (chosen and rejected in one batch; beta {cfg.beta}, "
                              f"{cfg.loss} loss"
                              f"{f' + {cfg.rpo_alpha} x chosen NLL' if cfg.rpo_alpha else ''})")

    def _load_model(self, resume_from):
        """(model, tokenizer, starting fingerprint): the starting model's fingerprint, or
        None when resuming (the model then has no trained weights yet; they come later)."""
        cfg = self.cfg
        fingerprint = None
        model, tokenizer = self.starting_model(resume_from)
        if resume_from is None:
            fingerprint = model_fingerprint(model, cfg.dtype)
        return self.apply_lora(model), tokenizer, fingerprint

    def _lengths(self):
        """Reply token counts: IPO compares length-averaged log-probabilities (as TRL does)."""
        self.train_len = np.stack(posttrain.reply_lengths(self.train_pairs), axis=1)
        self.val_len = np.stack(posttrain.reply_lengths(self.val_pairs), axis=1)

    def _reference(self, start, resume_from):
        """self.ref_train, self.ref_val: the starting model's log-probabilities of every pair,
        from the run folder's reference file when it was made for these pairs and this
        starting model, else computed now (and saved). On resume the starting model is the
        one the checkpoint names; it is loaded only if the file is missing or stale."""
        cfg = self.cfg
        path = self.run_dir / REFERENCE_FILE
        if resume_from is not None:
            meta = resume_from["meta"]
            start = meta.get("reference_model")
            if start is None:
                raise CheckpointError(f"{resume_from['path']}: not a DPO checkpoint (no "
                                      f"reference model fingerprint)")
            if meta["dataset"]["key"] != self.data_meta["key"]:  # before any reference work
                raise CheckpointError(f"{resume_from['path']}: dataset does not match: the "
                                      f"checkpoint was trained on other preference pairs")
        key = hashlib.sha256(f"{start}:{self.data_meta['key']}".encode()).hexdigest()
        self.reference_model = start
        found = load_reference(path, key)
        if found is not None:
            self.ref_train, self.ref_val = found
            log(cfg, f"reference log-probabilities: {path} (reused)")
            return
        model = self.model
        if resume_from is not None:  # the trained weights are not the reference: reload it
            model = self._starting_model(start)
        t0 = time.perf_counter()
        threads = shard_count(cfg.data_threads, cfg.batch_size, cfg.device, 0.0, cfg.threads)
        self.ref_train = reference_logprobs(model, self.train_pairs, cfg.batch_size, self.pad_id,
                                            threads)
        self.ref_val = reference_logprobs(model, self.val_pairs, cfg.batch_size, self.pad_id,
                                          threads)
        if self.is_main:  # every rank computed the same; rank 0 writes it
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_reference(path, key, self.ref_train, self.ref_val)
        log(cfg, f"reference log-probabilities of {len(self.train_pairs) + len(self.val_pairs):,} "
                 f"pairs computed in {time.perf_counter() - t0:.1f}s, saved to {path}")

    def _starting_model(self, fingerprint):
        """The model the run started from, loaded again; it must still be the same."""
        from tinyllm.generate import load_for_generation

        cfg = self.cfg
        model, tok = load_for_generation(cfg.base, tokenizer=cfg.tokenizer, device=cfg.device,
                                         dtype=param_dtype(cfg.dtype))
        model, _ = chat.prepare_for_chat(model, tok)
        if model_fingerprint(model, cfg.dtype) != fingerprint:
            raise CheckpointError(f"{cfg.base}: the starting model changed since the run began, "
                                  f"and {self.run_dir / REFERENCE_FILE} (its log-probabilities) "
                                  f"is missing or stale")
        return model

    # ---- batches and the loss ------------------------------------------------------------------
    def micro_batch(self, k):
        """Indices of this rank's training pairs of micro-batch k (all B in one process),
        drawn by a generator seeded with (seed, k): a pure function of k, so a resumed run
        draws the same batches."""
        rng = np.random.default_rng([self.cfg.seed, k])
        n = len(self.train_pairs)
        return rng.choice(n, size=self.cfg.batch_size, replace=n < self.cfg.batch_size)[self.rows]

    def pair_losses(self, encoded, ref, lengths):
        """(losses Tensor, chosen rewards, rejected rewards) of encoded pairs, given their
        reference log-probabilities (N, 2) and reply lengths (N, 2)."""
        cfg = self.cfg
        pc, pr = posttrain.pair_logprobs(self.model, encoded, self.pad_id)
        rc, rr = ref[:, 0], ref[:, 1]
        if cfg.loss == "ipo":  # per-token averages
            pc, pr = pc / self._dev(lengths[:, 0]), pr / self._dev(lengths[:, 1])
            rc, rr = rc / lengths[:, 0], rr / lengths[:, 1]
        losses, chosen, rejected = posttrain.dpo_loss(pc, pr, self._dev(rc), self._dev(rr),
                                                      cfg.beta, cfg.loss, cfg.label_smoothing)
        if cfg.rpo_alpha:
            nll = -pc if cfg.loss == "ipo" else -pc / self._dev(lengths[:, 0])
            losses = losses + cfg.rpo_alpha * nll
        return losses, chosen, rejected

    def _slice_grads(self, idx, weight):
        """Forward and backward of the pairs `idx`, their mean loss weighted by `weight`
        (len(idx) / pairs of the step): (metric sums, gradients of self.params)."""
        losses, rc, rr = self.pair_losses([self.train_pairs[i] for i in idx],
                                          self.ref_train[idx], self.train_len[idx])
        loss = losses.sum() * (weight / len(idx))
        grads = autograd.grad(self.scaler.scale(loss) if self.scaler else loss, self.params,
                              allow_unused=True)
        return posttrain.reward_stats(losses, rc, rr), grads

    def accumulate(self, idx, weight):
        """Gradients of one micro-batch added into .grad; its pairs split over threads on the
        CPU as in pretraining (train._sharded_backward: the loss is a mean over pairs, so each
        slice's share is its number of pairs). Returns the metric sums of its pairs."""
        slices = [(s, weight * len(s) / len(idx)) for s in np.array_split(idx, self.shards)
                  if len(s)]
        results = run_slices(self._slice_grads, slices) if len(slices) > 1 else \
            [self._slice_grads(*slices[0])]
        for k, p in enumerate(self.params):
            grads = [g[k] for _, g in results if g[k] is not None]
            if grads:
                total = grads[0]
                for g in grads[1:]:
                    total = total + g
                p.grad = total if p.grad is None else p.grad + total
        return {name: sum(s[name] for s, _ in results) for name in results[0][0]}

    def train_step(self):
        cfg = self.cfg
        lr = self.schedule.apply(self.optimizer, self.step)
        sums = {}
        for m in range(cfg.grad_accum):
            idx = self.micro_batch(self.step * cfg.grad_accum + m)
            weight = len(idx) / cfg.batch_size / cfg.grad_accum  # this rank's share of the pairs
            for name, v in self.accumulate(idx, weight).items():
                sums[name] = sums.get(name, 0.0) + v
            self.tokens_seen += sum(len(c) + len(r) for (c, _), (r, _) in
                                    (self.train_pairs[i] for i in idx))
        sums = dict(zip(sums, self.sum_over_ranks(list(sums.values())).tolist()))  # all ranks'
        n = cfg.batch_size * cfg.grad_accum
        loss = sums["loss"] / n
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {self.step}")
        norm = apply_update(self.params, self.optimizer, cfg.clip, self.scaler, self.dp)
        self.step += 1
        self.targets_seen = self.tokens_seen  # no share of the batch is masked out
        for name, v in sums.items():
            self.stats[name] = self.stats.get(name, 0.0) + v
        self.stats["pairs"] = self.stats.get("pairs", 0) + n
        return loss, lr, norm

    def log_metrics(self):
        """TRL's reward figures, means over the pairs since the last log line."""
        sums, self.stats = self.stats, {}
        return _means(sums, "")

    def evaluate_pairs(self):
        """Metric sums over the held-out pairs (no gradients), and their count."""
        B = self.cfg.batch_size
        sums = {}
        with autograd.no_grad():
            for i in range(0, len(self.val_pairs), B):
                sl = slice(i, i + B)
                stats = posttrain.reward_stats(*self.pair_losses(
                    self.val_pairs[sl], self.ref_val[sl], self.val_len[sl]))
                for name, v in stats.items():
                    sums[name] = sums.get(name, 0.0) + v
        sums["pairs"] = len(self.val_pairs)
        return sums

    def evaluate(self):
        """The mean DPO loss of the held-out pairs; their reward metrics are logged too."""
        self.model.eval()
        try:
            sums = self.evaluate_pairs()
        finally:
            self.model.train()
        self.val_metrics = _means(sums, "val_")
        return sums["loss"] / sums["pairs"]

    # ---- checkpoints ---------------------------------------------------------------------------
    def extra_meta(self):
        return {**super().extra_meta(), "reference_model": self.reference_model}


# ---- command line -------------------------------------------------------------------------------

def cmd_dpo(args):
    cfg = finetune.config_from_args(args, DPOConfig)
    if cfg.data != "builtin":
        preference.read_pairs(cfg.data)  # every line checked before any work
    _, code = finetune.start(args, cfg, DPORun)
    return code


def register(subparsers):
    from tinyllm.cli import probability

    d = DPOConfig()
    p = subparsers.add_parser(
        "dpo", help="preference tuning (DPO): prefer chosen replies to rejected ones",
        description="Direct Preference Optimization of a chat model on (prompt, chosen, "
                    "rejected) pairs, against the frozen starting model. Settings: DPOConfig "
                    "defaults < --config file < flags.")
    finetune.add_arguments(p, d, "pairs",
                           f"a JSON-lines file of {preference.FORMAT} (each a string or a list of "
                           f"chat messages), or builtin: right vs wrong answers to the built-in "
                           f"tasks")
    p.add_argument("--beta", type=positive_float,
                   help=f"strength of the pull towards the reference: larger stays closer "
                        f"({d.beta})")
    p.add_argument("--loss", choices=list(posttrain.LOSS_TYPES), help=f"({d.loss})")
    p.add_argument("--label-smoothing", type=probability,
                   help=f"sigmoid loss: assumed share of mislabelled pairs, in [0, 0.5) "
                        f"({d.label_smoothing})")
    p.add_argument("--rpo-alpha", type=nonnegative_float,
                   help=f"add this times the chosen replies' per-token negative log-likelihood "
                        f"to the loss (RPO), which keeps the chosen replies likely "
                        f"({d.rpo_alpha})")
    parallel.add_arguments(p)
    p.set_defaults(func=cmd_dpo)
    return p
