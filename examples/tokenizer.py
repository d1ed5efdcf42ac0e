"""Train a byte-level BPE tokenizer on the built-in corpus, then look at what it learned.

    python examples/tokenizer.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyllm.data import load_corpus  # noqa: E402
from tinyllm.tokenizer import Tokenizer  # noqa: E402

docs = load_corpus("builtin")  # (name, text) pairs: the English help texts inside CPython
tok = Tokenizer.train((text for _, text in docs), vocab_size=512)  # 256 byte tokens + 256 merges, then <|endoftext|>
print(tok)

text = "The context manager's __enter__() method is called first."
ids = tok.encode(text)
print(f"{len(text.encode())} bytes -> {len(ids)} tokens")
print(" | ".join(tok.decode([i]) for i in ids))
assert tok.decode(ids) == text

# the last merges learned: longer and longer common pieces of the corpus
for (a, b), new in sorted(tok.merges.items(), key=lambda kv: kv[1])[-5:]:
    print(f"{new}: {tok.decode([a])!r} + {tok.decode([b])!r} -> {tok.decode([new])!r}")

# special tokens are refused in text unless allowed
print(tok.encode("end<|endoftext|>", allowed_special="all")[-1] == tok.eot_id)
