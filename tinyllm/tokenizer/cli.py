"""`tinyllm tokenizer train|encode|decode|stats`.

A tokenizer argument (-t) is a file written by `train`/`Tokenizer.save`, a `.tiktoken` rank
file, or a directory holding GPT-2's `encoder.json` and `vocab.bpe`.
"""

import os
import sys
import time
from collections import Counter


def read_chunks(path, size=1 << 20):
    """The text of a file (or stdin for '-') in chunks, for streaming training."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8", newline="")
    try:
        while True:
            chunk = f.read(size)
            if not chunk:
                break
            yield chunk
    finally:
        if f is not sys.stdin:
            f.close()


def read_text(args):
    if getattr(args, "text", None) is not None:
        return args.text
    return "".join(read_chunks(args.input or "-"))


def load_any(spec):
    from tinyllm.tokenizer import Tokenizer

    if os.path.isdir(spec):
        return Tokenizer.from_gpt2(os.path.join(spec, "encoder.json"),
                                   os.path.join(spec, "vocab.bpe"))
    if spec.endswith(".tiktoken"):
        return Tokenizer.from_tiktoken(spec)
    return Tokenizer.load(spec)


def cmd_train(args):
    from tinyllm.tokenizer import Tokenizer

    specials = list(args.special or [])
    if not args.no_endoftext and "<|endoftext|>" not in specials:
        specials.insert(0, "<|endoftext|>")
    t0 = time.perf_counter()
    tok = Tokenizer.train(read_chunks(args.input), args.vocab_size, pattern=args.pattern,
                          special_tokens=specials, verbose=not args.quiet)
    tok.save(args.output)
    if args.vocab_dump:
        tok.save_vocab(args.vocab_dump)
    print(f"trained {tok!r} in {time.perf_counter() - t0:.2f}s -> {args.output}")
    return 0


def cmd_encode(args):
    tok = load_any(args.tokenizer)
    allowed = "all" if args.allow_special else set()
    disallowed = () if args.ordinary_special else "all"
    try:
        ids = tok.encode(read_text(args), allowed_special=allowed, disallowed_special=disallowed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(" ".join(map(str, ids)))
    return 0


def cmd_decode(args):
    tok = load_any(args.tokenizer)
    words = args.ids if args.ids else sys.stdin.read().split()
    try:
        ids = [int(w) for w in words]
        sys.stdout.write(tok.decode(ids))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.no_newline:
        sys.stdout.write("\n")
    return 0


def cmd_stats(args):
    from tinyllm.tokenizer.bpe import render_token

    tok = load_any(args.tokenizer)
    print(repr(tok))
    print(f"vocab size: {tok.vocab_size}  merges: {len(tok.merges)}  "
          f"special tokens: {tok.special_tokens}")
    if args.dump_vocab:
        tok.save_vocab(args.dump_vocab)
        print(f"vocab written to {args.dump_vocab}")
    if args.input or args.text is not None:
        text = read_text(args)
        t0 = time.perf_counter()
        ids = tok.encode(text, disallowed_special=())
        dt = time.perf_counter() - t0
        nbytes = len(text.encode("utf-8"))
        print(f"text: {nbytes:,} bytes, {len(text):,} chars -> {len(ids):,} tokens; "
              f"{nbytes / max(len(ids), 1):.3f} bytes/token; encoded in {dt:.3f}s "
              f"({nbytes / 1e6 / max(dt, 1e-9):.2f} MB/s)")
        print(f"distinct tokens used: {len(set(ids)):,} of {tok.vocab_size:,}")
        print(f"most frequent {args.top} tokens:")
        for i, c in Counter(ids).most_common(args.top):
            print(f"  {i:>7} {c:>9,}  [{render_token(tok.token_bytes(i))}]")
    return 0


def register(subparsers):
    p = subparsers.add_parser("tokenizer", help="train, run and inspect the BPE tokenizer",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on a text file")
    t.add_argument("input", help="training text file ('-' for stdin), read in streaming chunks")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="bytes + merges (special tokens are added after)")
    t.add_argument("--pattern", default="gpt2", help="gpt2, gpt4, o200k or a regex")
    t.add_argument("--special", action="append", metavar="TOKEN",
                   help="an extra special token (repeatable); <|endoftext|> is always added")
    t.add_argument("--no-endoftext", action="store_true", help="do not add <|endoftext|>")
    t.add_argument("-o", "--output", required=True, help="where to save the tokenizer")
    t.add_argument("--vocab-dump", help="also write a human-readable vocabulary here")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    def tok_arg(q):
        q.add_argument("-t", "--tokenizer", required=True,
                       help="saved tokenizer, .tiktoken file, or GPT-2 directory")

    e = sub.add_parser("encode", help="print the token ids of a text")
    tok_arg(e)
    e.add_argument("input", nargs="?", help="text file (default stdin)")
    e.add_argument("--text", help="the text itself instead of a file")
    e.add_argument("--allow-special", action="store_true",
                   help="encode special-token text as special tokens")
    e.add_argument("--ordinary-special", action="store_true",
                   help="encode special-token text as ordinary text instead of failing")
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="print the text of token ids")
    tok_arg(d)
    d.add_argument("ids", nargs="*", help="ids (default: whitespace-separated on stdin)")
    d.add_argument("-n", "--no-newline", action="store_true")
    d.set_defaults(func=cmd_decode)

    s = sub.add_parser("stats", help="vocab size, bytes per token and top tokens on a text")
    tok_arg(s)
    s.add_argument("input", nargs="?", help="text file to measure on")
    s.add_argument("--text", help="the text itself instead of a file")
    s.add_argument("--top", type=int, default=20)
    s.add_argument("--dump-vocab", help="write a human-readable vocabulary to this file")
    s.set_defaults(func=cmd_stats)
    return p
