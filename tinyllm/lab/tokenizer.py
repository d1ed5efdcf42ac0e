"""How does the vocabulary size trade compression against what a model learns for the same compute?

For each vocabulary size a byte-level BPE tokenizer is trained (tinyllm.tokenizer) on the
training split of the built-in corpus; 256 is bytes alone. Compression is the UTF-8 bytes per
token on the held-out validation split. Then the same model body is trained with each
tokenizer for the same compute, in training FLOPs (`GPT.flops_per_token`, which counts the
vocabulary's output layer): a larger vocabulary costs more per token and gets fewer steps.
Losses per token of different tokenizers do not compare, so the result is bits per byte on
the whole validation split: loss (nats/token) x tokens / bytes / ln 2.
"""

import math
import tempfile
from pathlib import Path

from tinyllm import data as data_mod
from tinyllm.lab import common
from tinyllm.tokenizer import Tokenizer

SMOKE = dict(steps=4, vocab_sizes=[256, 300], layers=1, d_model=16, context=16, batch_size=4,
             val_windows=4)


def add_arguments(p):
    from tinyllm.cli import positive_float, positive_int

    p.add_argument("--vocab-sizes", type=common.number_list(int, low=256), metavar="V,V,...",
                   default=[256, 512, 1024, 2048, 4096],
                   help="vocabulary sizes, >= 256 (default 256,512,1024,2048,4096)")
    p.add_argument("--steps", type=positive_int, default=700,
                   help="steps at vocabulary 1024 (or the first size); the others get the "
                        "same FLOPs (default 700)")
    p.add_argument("--context", type=positive_int, default=64,
                   help="tokens per sequence (default 64)")
    p.add_argument("--layers", type=positive_int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--d-model", type=positive_int, default=64, help="model width (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="sequences per step (default 8)")
    p.add_argument("--lr", type=positive_float, default=3e-3,
                   help="peak learning rate (default 3e-3)")
    p.add_argument("--val-windows", type=positive_int, default=None,
                   help="validation windows per evaluation (default: enough to read the whole "
                        "validation split once)")


def flops_per_token(model, vocab_size, context):
    from tinyllm.model import GPT

    return GPT.from_preset("laptop", **dict(model, vocab_size=vocab_size)).flops_per_token(context)


def run(args):
    sizes = sorted(set(args.vocab_sizes))
    model = dict(common.SMALL_MODEL, n_layers=args.layers, d_model=args.d_model,
                 context_length=args.context)
    train_docs, val_docs = data_mod.split_documents(data_mod.builtin_documents())
    val_bytes = sum(len(text.encode("utf-8")) for _, text in val_docs)
    reference = 1024 if 1024 in sizes else sizes[0]
    tokens_per_step = args.batch_size * args.context
    budget = args.steps * tokens_per_step * flops_per_token(model, reference + 1, args.context)
    rows, data, curves = [], {}, []
    with tempfile.TemporaryDirectory(prefix="tinyllm-lab-") as folder:
        for V in sizes:
            tok = Tokenizer.bytes() if V == 256 else Tokenizer.train(
                (text for _, text in train_docs), V)
            path = Path(folder) / f"v{V}.json"
            tok.save(path)
            # every validation token once: the EOT after each document counts as a token
            val_tokens = sum(len(tok.encode_ordinary(text)) + 1 for _, text in val_docs)
            steps = max(1, round(budget / (tokens_per_step * flops_per_token(
                model, tok.vocab_size, args.context))))
            c = common.train(f"vocab {V}", steps, args.device, model, tokenizer=str(path),
                             lr=args.lr, min_lr=args.lr / 10, batch_size=args.batch_size,
                             seed=args.seed, eval_every=max(1, steps // 4),
                             eval_iters=math.ceil((args.val_windows or val_tokens / args.context)
                                                  / args.batch_size))
            bpt = val_bytes / val_tokens  # bytes per token
            bpb = c.final_val / bpt / math.log(2)
            n_params = c.run.model.num_params(non_embedding=False)
            data[V] = dict(bytes_per_token=bpt, bits_per_byte=bpb, steps=steps,
                           val_loss=c.final_val, params=n_params,
                           text_bytes_seen=steps * tokens_per_step * bpt, seconds=c.elapsed_s)
            rows.append([V, f"{bpt:.2f}", steps, f"{steps * tokens_per_step * bpt / 1e6:.2f}",
                         n_params, c.final_val, bpb, f"{c.elapsed_s:.0f}"])
            curves.append((V, c, bpt))
    return common.Result(
        title="Lab 7: tokenizer (vocabulary size, compression and bits per byte)",
        question=__doc__.strip().splitlines()[0],
        headers=["vocabulary", "bytes per token (val)", "steps", "MB of text seen",
                 "parameters", "val loss (nats/token)", "bits per byte (val)", "train seconds"],
        rows=rows, draw=lambda: draw(sizes, data, curves), shows=findings(sizes, data),
        setup=[f"model: {args.layers} layers, d_model {args.d_model}, context {args.context} "
               "tokens, llama flavour with tied embeddings",
               f"compute: {budget / 1e12:.3g} TFLOP per run ({args.steps} steps of "
               f"{args.batch_size} x {args.context} tokens at vocabulary {reference}); "
               f"peak lr {args.lr:g}, cosine to a tenth",
               f"tokenizers trained on the training split ({sum(len(t) for _, t in train_docs):,} "
               f"characters); validation: {len(val_docs)} documents, {val_bytes:,} bytes, "
               "read whole in non-overlapping windows"],
        data={str(k): v for k, v in data.items()})


def findings(sizes, data):
    bpb = {V: data[V]["bits_per_byte"] for V in sizes}
    lo, hi = sizes[0], sizes[-1]
    text = (f"Compression grew from {data[lo]['bytes_per_token']:.2f} bytes per token at "
            f"vocabulary {lo} to {data[hi]['bytes_per_token']:.2f} at {hi}; at equal compute "
            f"the {hi} model took {data[hi]['steps']} steps against {data[lo]['steps']} and read "
            f"{data[hi]['text_bytes_seen'] / data[lo]['text_bytes_seen']:.1f}x as much text.")
    finite = [V for V in sizes if math.isfinite(bpb[V])]
    if not finite:
        return text + " Every run diverged."
    best, worst = min(finite, key=bpb.get), max(finite, key=bpb.get)
    text += (f" Bits per byte were lowest at vocabulary {best} ({bpb[best]:.3f}) and highest "
             f"at {worst} ({bpb[worst]:.3f}).")
    falls = [bpb[b] <= bpb[a] for a, b in zip(finite, finite[1:])]
    if all(falls):
        text += " Each larger vocabulary did better: more text per step outweighed the cost "
        text += "of the larger output layer throughout this range."
    elif not any(falls):
        text += " Each larger vocabulary did worse: the output layer's cost and the rarer "
        text += "tokens (each seen fewer times) outweighed the compression."
    else:
        text += (" The curve is not monotonic (" + ", ".join(f"{bpb[V]:.3f} at {V}" for V in finite)
                 + "): past the jump from bytes to merges, the gains of compression and the "
                 "costs of a larger output layer and rarer tokens nearly cancel at this budget.")
    return text


def draw(sizes, data, curves):
    fig, (ax, ax2) = common.figure(2, width=5.8, height=4.2)
    ax.plot(sizes, [data[V]["bytes_per_token"] for V in sizes], "o-", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("bytes per token (validation)", color="tab:blue")
    ax.grid(alpha=0.3)
    axb = ax.twinx()
    axb.plot(sizes, [data[V]["bits_per_byte"] for V in sizes], "s-", color="tab:red")
    axb.set_ylabel("bits per byte at equal compute", color="tab:red")
    ax.set_title("compression and bits per byte")
    for V, c, bpt in curves:  # val loss in bits per byte against the text read
        per_step = c.run.cfg.batch_size * c.run.block_size * bpt
        ax2.plot([s * per_step / 1e6 for s in c.val_steps],
                 [v / bpt / math.log(2) for v in c.val_loss], "o-", label=f"vocab {V}")
    ax2.set_xlabel("MB of text read")
    ax2.set_ylabel("validation bits per byte")
    ax2.set_title("learning curves (equal compute at the end)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    return fig
