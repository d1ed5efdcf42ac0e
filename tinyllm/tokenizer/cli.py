"""`tinyllm tokenizer train|encode|decode|stats`.

A tokenizer argument (-t) is a file written by `train`/`Tokenizer.save`, a `.tiktoken` rank
file, or a directory holding GPT-2's `encoder.json` and `vocab.bpe`. Every path, flag and file
is checked before any work is done or any file written; a bad one is one line on stderr and
exit code 2 (see tinyllm/cli.py).
"""

import os
import sys
import time
from collections import Counter

from tinyllm.cli import UsageError, check_int, positive_int


# ---- checks of paths and flags -------------------------------------------------------------

def check_input_file(flag, path):
    """`path` names a readable file ('-' is stdin)."""
    if path == "-":
        return
    if not os.path.exists(path):
        raise UsageError(f"{flag}: no such file: {path}")
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag}: cannot read {path} (permission denied)")


def check_output_file(flag, path):
    """`path` can be written: not a folder, in a folder that exists and is writable."""
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a folder; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag}: the folder {os.path.dirname(path) or folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag}: cannot write in {folder} (permission denied)")


def check_text_source(args):
    """An INPUT file or --text, not both; the file must be readable."""
    if args.input is not None and args.text is not None:
        raise UsageError(f"give either INPUT or --text, not both (got {args.input!r} and --text)")
    if args.input is not None:
        check_input_file("INPUT", args.input)


def read_chunks(path, size=1 << 20):
    """The text of a file (or stdin for '-') in chunks, for streaming training; text that is
    not UTF-8 raises ValueError naming the file."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8", newline="")
    try:
        while True:
            try:
                chunk = f.read(size)
            except UnicodeDecodeError as e:
                raise ValueError(f"{'stdin' if path == '-' else path}: not UTF-8 text "
                                 f"({e.reason})") from None
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


def load_any(spec, trust_pattern=False):
    """A saved tokenizer, a .tiktoken rank file or a GPT-2 folder; errors name the path."""
    from tinyllm.tokenizer import Tokenizer

    if not os.path.exists(spec):
        raise UsageError(f"-t/--tokenizer: no such file or folder: {spec}")
    if os.path.isdir(spec):
        files = [os.path.join(spec, n) for n in ("encoder.json", "vocab.bpe")]
        if not all(map(os.path.isfile, files)):
            raise UsageError(f"-t/--tokenizer: {spec} is a folder without GPT-2's encoder.json "
                             f"and vocab.bpe")
        return Tokenizer.from_gpt2(*files)
    if spec.endswith(".tiktoken"):
        return Tokenizer.from_tiktoken(spec, trust_pattern=trust_pattern)
    return Tokenizer.load(spec, trust_pattern=trust_pattern)


# ---- the actions ---------------------------------------------------------------------------

def cmd_train(args):
    from tinyllm.tokenizer import Tokenizer
    from tinyllm.tokenizer.patterns import check_pattern

    check_input_file("INPUT", args.input)
    check_int("--vocab-size", args.vocab_size, low=256)
    try:
        pattern = check_pattern(args.pattern, trust=args.trust_pattern)
    except ValueError as e:
        raise UsageError(f"--pattern: {e}") from None
    specials = list(args.special or [])
    for s in specials:
        if not s:
            raise UsageError("--special: a special token must be a non-empty string")
    check_output_file("-o/--output", args.output)
    if args.vocab_dump:
        check_output_file("--vocab-dump", args.vocab_dump)
    if not args.no_endoftext and "<|endoftext|>" not in specials:
        specials.insert(0, "<|endoftext|>")
    t0 = time.perf_counter()
    tok = Tokenizer.train(read_chunks(args.input), args.vocab_size, pattern=pattern,
                          special_tokens=specials, verbose=not args.quiet,
                          trust_pattern=args.trust_pattern)
    tok.save(args.output)
    if args.vocab_dump:
        tok.save_vocab(args.vocab_dump)
    print(f"trained {tok!r} in {time.perf_counter() - t0:.2f}s -> {args.output}")
    return 0


def cmd_encode(args):
    check_text_source(args)
    tok = load_any(args.tokenizer, args.trust_pattern)
    allowed = "all" if args.allow_special else set()
    disallowed = () if args.ordinary_special else "all"
    # A special token's text in the input is bad input: ValueError, one line, exit 2.
    ids = tok.encode(read_text(args), allowed_special=allowed, disallowed_special=disallowed)
    print(" ".join(map(str, ids)))
    return 0


def parse_ids(words):
    ids = []
    for w in words:
        try:
            ids.append(int(w))
        except ValueError:
            raise UsageError(f"not a token id: {w[:40]!r} (ids are integers)") from None
    return ids


def cmd_decode(args):
    tok = load_any(args.tokenizer, args.trust_pattern)
    ids = parse_ids(args.ids if args.ids else sys.stdin.read().split())
    text = tok.decode(ids)  # an unknown id: ValueError naming it
    sys.stdout.write(text)
    if not args.no_newline:
        sys.stdout.write("\n")
    return 0


def cmd_stats(args):
    from tinyllm.tokenizer.bpe import render_token

    check_text_source(args)
    if args.dump_vocab:
        check_output_file("--dump-vocab", args.dump_vocab)
    tok = load_any(args.tokenizer, args.trust_pattern)
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
                   help="bytes + merges, at least 256 (special tokens are added after)")
    t.add_argument("--pattern", default="gpt2",
                   help="gpt2, gpt4 (cl100k), o200k or a regex (which must tile any text and "
                        "run in linear time, unless --trust-pattern)")
    t.add_argument("--trust-pattern", action="store_true",
                   help="use a custom --pattern without the safety check")
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
        q.add_argument("--trust-pattern", action="store_true",
                       help="load a tokenizer file whose custom split pattern fails the "
                            "safety check")

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
    s.add_argument("--top", type=positive_int, default=20, help="how many tokens to list")
    s.add_argument("--dump-vocab", help="write a human-readable vocabulary to this file")
    s.set_defaults(func=cmd_stats)
    return p
