"""How much compute does padding waste, and what does packing buy at the same compute?

The documents are the paragraphs of the built-in corpus (blank-line separated: a long-tailed
mix of short and long texts), each ending in <|endoftext|> and cut into pieces of at most
context + 1 tokens. Two ways to batch them:

    packed:  all documents concatenated, EOT-separated, cut into full windows of the context
             (the way `tinyllm train` batches; a window may span several documents)
    padded:  one piece per row, padded to the longest piece of the batch; padded positions
             are computed but their targets are ignored

Both train the same model with the same batch size for the same compute: tokens through the
model, padding included (the padded run gets as many steps as fit in the packed run's tokens).
Validation is measured both ways: on packed windows, and on whole documents one per row.
"""

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from tinyllm import data as data_mod
from tinyllm.lab import common
from tinyllm.train import IGNORE_INDEX, Run

SMOKE = dict(steps=4, layers=1, d_model=16, context=16, batch_size=4, val_docs=8)


def add_arguments(p):
    from tinyllm.cli import positive_float, positive_int

    p.add_argument("--steps", type=positive_int, default=800,
                   help="steps of the packed run (default 800)")
    p.add_argument("--context", type=positive_int, default=64, help="context length (default 64)")
    p.add_argument("--layers", type=positive_int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--d-model", type=positive_int, default=64, help="model width (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="rows per batch (default 16)")
    p.add_argument("--lr", type=positive_float, default=3e-3,
                   help="peak learning rate (default 3e-3)")
    p.add_argument("--val-docs", type=positive_int, default=256,
                   help="validation documents in the whole-document loss (default 256)")


def paragraphs(docs):
    """The built-in corpus's paragraphs (blank-line separated, stripped), as JSON lines."""
    return [p.strip() for _, text in docs for p in text.split("\n\n") if p.strip()]


def pieces(tokens, eot, length):
    """The documents of a flat EOT-separated token array (each with its EOT), cut into pieces
    of at most `length` tokens; pieces of one token (nothing to predict) are dropped."""
    ends = np.flatnonzero(np.asarray(tokens) == eot)
    out, start = [], 0
    for end in ends:
        doc = np.asarray(tokens[start:end + 1], dtype=np.int64)
        out += [doc[i:i + length] for i in range(0, len(doc), length) if len(doc[i:i + length]) > 1]
        start = end + 1
    return out


def padded_batch(rows, eot):
    """(x, y) of pieces padded to the longest: inputs filled with EOT, targets ignored."""
    x = data_mod.pad_right([r[:-1] for r in rows], eot)
    y = data_mod.pad_right([r[1:] for r in rows], IGNORE_INDEX)
    return x, y


class CountingRun(Run):
    """A pretraining run that keeps, after each step, the tokens through the model (padding
    included: the compute axis of the plot) and the targets that counted in the loss."""

    def setup(self, resume_from):
        super().setup(resume_from)
        self.compute, self.trained = [0], [0]  # by the end of step s

    def train_step(self):
        # fit() zeroes both counters at each log line, after the step: the step's own counts
        tokens, targets = self.tokens_seen, getattr(self, "targets_seen", 0)
        out = super().train_step()
        self.compute.append(self.compute[-1] + self.tokens_seen - tokens)
        self.trained.append(self.trained[-1] + self.targets_seen - targets)
        return out


class PaddedRun(CountingRun):
    """Batches of one document piece per row, padded to the longest row of the batch."""

    def setup(self, resume_from):
        super().setup(resume_from)
        eot = self.tokenizer.eot_id
        self.pieces = pieces(self.dataset.train, eot, self.block_size + 1)

    def micro_batch(self, k):
        rng = np.random.default_rng([self.cfg.seed, k])
        rows = [self.pieces[i] for i in rng.integers(0, len(self.pieces), self.cfg.batch_size)]
        x, y = padded_batch(rows, self.tokenizer.eot_id)
        self.padding_seen += int((y == IGNORE_INDEX).sum())
        return x, y

    def steps_for(self, budget):
        """How many steps fit in `budget` tokens processed (padding included)."""
        total, k = 0, 0
        while total < budget:
            total += self.micro_batch(k)[0].size
            k += 1
        self.padding_seen = 0
        return k


def document_loss(run, docs):
    """Mean loss per target over whole validation documents, one per row, padding ignored."""
    import autograd

    run.model.eval()
    total, count = 0.0, 0
    B = run.cfg.batch_size
    with autograd.no_grad():
        for i in range(0, len(docs), B):
            x, y = padded_batch(docs[i:i + B], run.tokenizer.eot_id)
            n = int((y != IGNORE_INDEX).sum())
            _, loss = run.model(run._dev(x), run._dev(y), return_logits=False)
            total, count = total + loss.item() * n, count + n
    run.model.train()
    return total / count


def run(args):
    model = dict(common.SMALL_MODEL, n_layers=args.layers, d_model=args.d_model,
                 context_length=args.context)
    with tempfile.TemporaryDirectory(prefix="tinyllm-lab-") as folder:
        corpus = Path(folder) / "paragraphs.jsonl"  # documents are named paragraphs.jsonl:LINE
        corpus.write_text("".join(json.dumps({"text": p}) + "\n"
                                  for p in paragraphs(data_mod.builtin_documents())))
        settings = dict(data=str(corpus), lr=args.lr, min_lr=args.lr / 10,
                        batch_size=args.batch_size, seed=args.seed, log_every=1,
                        eval_every=max(1, args.steps // 8))
        packed = common.train("packed", args.steps, args.device, model, run_class=CountingRun,
                              **settings)
        budget = packed.run.compute[-1]
        probe = PaddedRun(packed.run.cfg)  # the same data and tokenizer, to count its steps
        padded_steps = probe.steps_for(budget)
        padded = common.train("padded", padded_steps, args.device, model, run_class=PaddedRun,
                              **dict(settings, eval_every=max(1, padded_steps // 8)))
    val_docs = pieces(packed.run.dataset.val, packed.run.tokenizer.eot_id,
                      args.context + 1)[:args.val_docs]
    rows, data = [], {}
    for c in (packed, padded):
        r = c.run
        processed = r.compute[-1]
        pad = processed - r.trained[-1]
        doc_loss = document_loss(r, val_docs)
        data[c.label] = dict(steps=r.step, processed=processed, padding=pad,
                             waste=pad / processed, val_loss=c.final_val, doc_loss=doc_loss,
                             seconds=c.elapsed_s)
        rows.append([c.label, r.step, processed, f"{100 * pad / processed:.1f}%",
                     processed - pad, c.final_val, doc_loss, f"{c.elapsed_s:.0f}"])
    lengths = np.array([len(p) - 1 for p in probe.pieces])
    train_tokens = len(packed.run.dataset.train)
    return common.Result(
        title="Lab 6: data packing (EOT-separated packing against padding)",
        question=__doc__.strip().splitlines()[0],
        headers=["batching", "steps", "tokens processed", "of which padding",
                 "tokens trained on", "val loss, packed windows", "val loss, whole documents",
                 "train seconds"],
        rows=rows, shows=findings(data, lengths, args),
        draw=lambda: draw(packed, padded, lengths, data["padded"]["waste"]),
        setup=[f"model: {args.layers} layers, d_model {args.d_model}, context {args.context}, "
               f"llama flavour; BPE vocabulary 1024 trained on the paragraphs",
               f"documents: {len(probe.pieces):,} training pieces of at most {args.context} "
               f"targets, median {int(np.median(lengths))}, mean {lengths.mean():.1f}; the "
               f"training split holds {train_tokens:,} tokens, so the packed run read it "
               f"{budget / train_tokens:.1f} times and the padded run "
               f"{(data['padded']['processed'] - data['padded']['padding']) / train_tokens:.1f}"
               " times",
               f"batch {args.batch_size} rows; peak lr {args.lr:g}, cosine to a tenth; the "
               f"padded run gets as many steps as fit in the packed run's {budget:,} tokens",
               "val loss, packed windows: `tinyllm train`'s validation (fixed windows of the "
               f"val split); whole documents: {len(val_docs)} validation pieces from their "
               "first token, one per row"],
        data=data)


def findings(data, lengths, args):
    p, q = data["packed"], data["padded"]
    text = (f"Padding each batch to its longest document wasted {100 * q['waste']:.0f}% of the "
            f"compute (documents of median length {int(np.median(lengths))} tokens, padded to up "
            f"to {args.context}): at the same {p['processed']:,} tokens processed, the padded run "
            f"trained on {q['processed'] - q['padding']:,} tokens against packing's "
            f"{p['processed']:,}.")
    d_packed, d_docs = q["val_loss"] - p["val_loss"], q["doc_loss"] - p["doc_loss"]
    if math.isnan(d_packed):
        return text + " A run diverged; see the table."
    if q["steps"] <= 1.1 * p["steps"]:
        text += (f" Padding bought few extra steps ({q['steps']} against {p['steps']}): with "
                 f"{args.batch_size} rows nearly every batch holds one piece of the full "
                 f"{args.context} tokens, so padded batches are about as wide as packed ones.")
    text += (f" Packing ended {abs(d_packed):.3f} nats/token "
             f"{'lower' if d_packed > 0 else 'higher'} on packed validation windows and "
             f"{abs(d_docs):.3f} {'lower' if d_docs > 0 else 'higher'} on whole documents read "
             "from their start")
    text += (", so the windows that span document boundaries did not cost it the skill "
             "the padded run practises." if d_docs > 0 else
             ": the padded run, which always sees a document from its first token, does better "
             "on that format even with less data.")
    return text


def draw(packed, padded, lengths, waste):
    fig, (ax, ax2) = common.figure(2, width=6.0, height=4.2)
    for c, color in ((packed, "tab:blue"), (padded, "tab:orange")):
        comp = c.run.compute
        ax.plot([comp[s] for s in c.steps], c.loss, color=color, alpha=0.35, lw=0.8)
        ax.plot([comp[s] for s in c.val_steps], c.val_loss, "o-", color=color,
                label=f"{c.label}: val loss")
    ax.set_xlabel("tokens processed (compute, padding included)")
    ax.set_ylabel("loss (nats/token); faint: train")
    ax.set_title("loss per unit of compute")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.hist(lengths, bins=40, color="gray")
    median = int(np.median(lengths))
    ax2.axvline(median, color="black", ls="--", label=f"median {median}")
    ax2.set_xlabel("document piece length (targets)")
    ax2.set_ylabel("pieces")
    ax2.set_title(f"padded to the longest in the batch: {100 * waste:.0f}% of compute wasted")
    ax2.legend()
    fig.tight_layout()
    return fig
