"""Tokenizer benchmark: training and encoding speed against tiktoken and Hugging Face tokenizers.

    python benchmarks/tokenizer.py [--text ../shared/data/tinyshakespeare.txt] [--repeats 3]

Training: ours vs `tokenizers`' BpeTrainer to vocab 4096 and 16384 on the same text, same
split: a `Split` pre-tokenizer with our GPT-2 regex (tiktoken's r50k pattern string) followed
by `ByteLevel(use_regex=False)` (bytes -> GPT-2's printable characters, no second split), with
the 256-character byte alphabet as the initial alphabet. Both trainers get the whole text as
one string. Times are the best of --repeats runs.

Encoding: the whole text as one string, single thread, with the GPT-2 vocabulary in all three
(ours from r50k_base.tiktoken; tiktoken from the same file; `tokenizers` from encoder.json +
vocab.bpe with its ByteLevel pre-tokenizer). Ours is timed cold (a fresh tokenizer, empty piece
cache) and warm (cache filled by an earlier call). `tokenizers` is also timed as
`encode_batch` over the text's lines (its multi-threaded path), and tiktoken as
`encode_ordinary_batch` over lines (threads too), as the best each library offers.
"""

import argparse
import os
import platform
import subprocess
import sys
import time

from machine import cpu_model  # benchmarks/machine.py
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinyllm.tokenizer import GPT2_PATTERN, Tokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def best_of(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def hf_train(text, vocab_size):
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def machine():
    cpu = cpu_model()
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()}, {date}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(DATA / "tinyshakespeare.txt"))
    ap.add_argument("--vocab-dir", default=str(DATA / "vocab"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if not os.path.exists(args.text):
        print(f"skipped: {args.text} not found")
        return 0
    import tiktoken
    import tokenizers
    from tiktoken.load import load_tiktoken_bpe

    text = Path(args.text).read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    print(f"machine: {machine()}")
    print(f"text: {args.text} ({mb:.3f} MB); tiktoken {tiktoken.__version__}, "
          f"tokenizers {tokenizers.__version__}")
    rows = []

    print("\n## training (best of %d)" % args.repeats)
    for vocab_size in (4096, 16384):
        t_ours, ours = best_of(lambda: Tokenizer.train(text, vocab_size), args.repeats)
        t_hf, hf = best_of(lambda: hf_train(text, vocab_size), args.repeats)
        n_ours = len(ours.encode_ordinary(text))
        n_hf = len(hf.encode(text).ids)
        ratio = t_ours / t_hf
        print(f"vocab {vocab_size}: ours {t_ours:.3f}s, tokenizers {t_hf:.3f}s, "
              f"ours/tokenizers = {ratio:.2f}x (target <= 1.5x: "
              f"{'met' if ratio <= 1.5 else 'NOT met'}); tokens on the text: ours {n_ours:,}, "
              f"tokenizers {n_hf:,}")
        rows.append((f"train to {vocab_size}", f"{t_ours:.3f} s", f"{t_hf:.3f} s", "-",
                     f"{ratio:.2f}x of tokenizers"))

    print("\n## encoding with the GPT-2 vocabulary (MB/s, best of %d)" % args.repeats)
    vocab = Path(args.vocab_dir)
    ranks_path = vocab / "r50k_base.tiktoken"
    ours = Tokenizer.from_tiktoken(ranks_path)
    tt = tiktoken.Encoding(name="r50k_bench", pat_str=GPT2_PATTERN,
                           mergeable_ranks=load_tiktoken_bpe(str(ranks_path)),
                           special_tokens={"<|endoftext|>": 50256})
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    hf = HFTokenizer(models.BPE.from_file(str(vocab / "encoder.json"), str(vocab / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    lines = text.splitlines(keepends=True)

    def cold():
        return Tokenizer.from_tiktoken(ranks_path)

    cold_times = []
    for _ in range(args.repeats):
        fresh = cold()
        t0 = time.perf_counter()
        ids_ours = fresh.encode_ordinary(text)
        cold_times.append(time.perf_counter() - t0)
    t_cold = min(cold_times)
    ours.encode_ordinary(text)
    t_warm, _ = best_of(lambda: ours.encode_ordinary(text), args.repeats)
    t_tt, ids_tt = best_of(lambda: tt.encode_ordinary(text), args.repeats)
    t_tt_batch, _ = best_of(lambda: tt.encode_ordinary_batch(lines), args.repeats)
    t_hf, enc_hf = best_of(lambda: hf.encode(text), args.repeats)
    t_hf_batch, _ = best_of(lambda: hf.encode_batch(lines), args.repeats)
    assert ids_ours == ids_tt, "ids differ from tiktoken"
    same_hf = enc_hf.ids == ids_tt
    speeds = {
        "ours (cold cache)": mb / t_cold, "ours (warm cache)": mb / t_warm,
        "tiktoken encode_ordinary": mb / t_tt, "tiktoken batch of lines (threads)": mb / t_tt_batch,
        "tokenizers encode": mb / t_hf, "tokenizers encode_batch of lines (threads)":
            mb / t_hf_batch,
    }
    for k, v in speeds.items():
        print(f"{k:45s} {v:8.2f} MB/s")
    print(f"tokenizers' ids equal tiktoken's: {same_hf}")
    best_hf = max(speeds["tokenizers encode"], speeds["tokenizers encode_batch of lines (threads)"])
    for label in ("ours (cold cache)", "ours (warm cache)"):
        s = speeds[label]
        r_tt = speeds["tiktoken encode_ordinary"] / s
        r_hf = s / best_hf
        print(f"{label}: tiktoken is {r_tt:.2f}x faster (target <= 3x: "
              f"{'met' if r_tt <= 3 else 'NOT met'}); ours is {r_hf:.2f}x the best `tokenizers` "
              f"figure (target >= 1x: {'met' if r_hf >= 1 else 'NOT met'})")
        rows.append((f"encode GPT-2, {label}", f"{s:.2f} MB/s", f"{best_hf:.2f} MB/s",
                     f"{speeds['tiktoken encode_ordinary']:.2f} MB/s",
                     f"{r_hf:.2f}x tokenizers, 1/{r_tt:.2f} tiktoken"))

    print("\n| task | ours | tokenizers | tiktoken | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
