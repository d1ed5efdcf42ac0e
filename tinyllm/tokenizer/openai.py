"""Loading OpenAI's vocabularies: tiktoken rank files and GPT-2's encoder.json + vocab.bpe.

A rank file lists each token's bytes with its rank, which is also its id. tiktoken encodes a
piece by repeatedly merging the adjacent pair whose *concatenated bytes* have the lowest rank.
Our tokenizer merges by *pair*, so the pair merges are recovered: token T of rank r is made
by the merge (x, y) -> r, where x, y are the two parts that tiktoken's own procedure reaches
on T's bytes when only ranks below r may be used. Taking the tokens in rank order, that is
our pair merging with the merges recovered so far. Why it is the same encoder: when tiktoken
forms T inside a longer piece, no pair straddling T's edges was merged (else T could not
form) and every pair inside T ranked below r was already merged, so T's insides are exactly
the state reached on T alone with ranks below r: its recovered split.
"""

import base64
import json
import os

from .bpe import ENDOFTEXT, bpe_long, bpe_short, _SHORT_PIECE
from .patterns import GPT2_PATTERN, GPT4_PATTERN, O200K_PATTERN, bytes_to_unicode

# Known rank files, by file stem: pattern and special tokens as tiktoken defines them.
KNOWN_ENCODINGS = {
    "r50k_base": (GPT2_PATTERN, {ENDOFTEXT: 50256}),
    "gpt2": (GPT2_PATTERN, {ENDOFTEXT: 50256}),
    "p50k_base": (GPT2_PATTERN, {ENDOFTEXT: 50256}),
    "cl100k_base": (GPT4_PATTERN, {
        ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
    "o200k_base": (O200K_PATTERN, {ENDOFTEXT: 199999, "<|endofprompt|>": 200018}),
}


def read_tiktoken_ranks(path):
    """bytes -> rank from a `.tiktoken` file (lines: base64 token, space, rank)."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a 'base64 rank' line ({e})") from None
    return ranks


def recover_merges(ranks):
    """(byte_ids, merges) from bytes -> rank: the id of each single byte, and the pair merges
    (a, b, rank) in rank order (see the module docstring)."""
    byte_ids = [None] * 256
    for token, rank in ranks.items():
        if len(token) == 1:
            byte_ids[token[0]] = rank
    missing = [b for b in range(256) if byte_ids[b] is None]
    if missing:
        raise ValueError(f"the vocabulary lacks {len(missing)} single-byte tokens, e.g. {missing[:5]}")
    merges = {}
    triples = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        ids = [byte_ids[x] for x in token]
        parts = bpe_short(ids, merges) if len(ids) <= _SHORT_PIECE else bpe_long(ids, merges)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two earlier tokens")
        merges[(parts[0], parts[1])] = rank
        triples.append((parts[0], parts[1], rank))
    return byte_ids, triples


def from_tiktoken(cls, path, pattern=None, special_tokens=None):
    ranks = read_tiktoken_ranks(path)
    stem = os.path.basename(os.fspath(path)).split(".")[0]
    known_pattern, known_specials = KNOWN_ENCODINGS.get(stem, (GPT2_PATTERN, None))
    if pattern is None:
        pattern = known_pattern
    if special_tokens is None:
        special_tokens = known_specials or {ENDOFTEXT: max(ranks.values()) + 1}
    byte_ids, merges = recover_merges(ranks)
    return cls(merges, pattern=pattern, special_tokens=special_tokens, byte_ids=byte_ids,
               whole_token_lookup=True)


def from_gpt2(cls, encoder_json, vocab_bpe):
    """GPT-2's files spell each byte as a printable character (`bytes_to_unicode`); the merges
    in vocab.bpe are listed in rank order and the merged token's id is its encoder.json id."""
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        lines = f.read().split("\n")
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    byte_ids = [encoder[bytes_to_unicode()[b]] for b in range(256)]
    merges = []
    for line in lines[1:]:  # the first line is "#version: 0.2"
        if not line.strip():
            continue
        x, y = line.split()
        merges.append((encoder[x], encoder[y], encoder[x + y]))
    merges.sort(key=lambda m: m[2])
    made = set(byte_ids) | {m[2] for m in merges}
    specials = {s: i for s, i in encoder.items() if i not in made}
    for s in specials:
        if any(c not in byte_decoder for c in s) or s.startswith("<|"):
            continue
        raise ValueError(f"{encoder_json}: token {s!r} is neither a byte, a merge nor special")
    return cls(merges, pattern=GPT2_PATTERN, special_tokens=specials, byte_ids=byte_ids,
               whole_token_lookup=True)
