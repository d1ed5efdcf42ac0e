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

from .bpe import ENDOFTEXT, TokenizerFileError, bpe_long, bpe_short, _SHORT_PIECE
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


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TokenizerFileError(f"{path}: cannot read: {e.strerror or e}") from None


def read_tiktoken_ranks(path):
    """bytes -> rank from a `.tiktoken` file (lines: base64 token, space, rank)."""
    ranks = {}
    for lineno, line in enumerate(_read_bytes(path).splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise TokenizerFileError(f"{path}:{lineno}: not a 'base64 rank' line ({e})") \
                from None
    if not ranks:
        raise TokenizerFileError(f"{path}: no ranks in the file (empty?)")
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


def from_tiktoken(cls, path, pattern=None, special_tokens=None, trust_pattern=False):
    ranks = read_tiktoken_ranks(path)
    stem = os.path.basename(os.fspath(path)).split(".")[0]
    known_pattern, known_specials = KNOWN_ENCODINGS.get(stem, (GPT2_PATTERN, None))
    if pattern is None:
        pattern = known_pattern
    if special_tokens is None:
        special_tokens = known_specials or {ENDOFTEXT: max(ranks.values()) + 1}
    try:
        byte_ids, merges = recover_merges(ranks)
    except ValueError as e:
        raise TokenizerFileError(f"{path}: {e}") from None
    return cls(merges, pattern=pattern, special_tokens=special_tokens, byte_ids=byte_ids,
               whole_token_lookup=True, trust_pattern=trust_pattern)


def from_gpt2(cls, encoder_json, vocab_bpe):
    """GPT-2's files spell each byte as a printable character (`bytes_to_unicode`); the merges
    in vocab.bpe are listed in rank order and the merged token's id is its encoder.json id.
    Errors name the file (and line) and what is wrong."""
    encoder = _read_encoder(encoder_json)
    try:
        lines = _read_bytes(vocab_bpe).decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{vocab_bpe}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    missing = [c for c in bytes_to_unicode().values() if c not in encoder]
    if missing:
        raise TokenizerFileError(f"{encoder_json}: lacks {len(missing)} of the 256 byte tokens, "
                                 f"e.g. {missing[0]!r}")
    byte_ids = [encoder[bytes_to_unicode()[b]] for b in range(256)]
    merges = []
    for lineno, line in enumerate(lines[1:], 2):  # the first line is "#version: 0.2"
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(f"{vocab_bpe}:{lineno}: expected two tokens, got {line!r}")
        x, y = parts
        for t in (x, y, x + y):
            if t not in encoder:
                raise TokenizerFileError(f"{vocab_bpe}:{lineno}: token {t!r} is not in "
                                         f"{encoder_json}")
        merges.append((encoder[x], encoder[y], encoder[x + y]))
    merges.sort(key=lambda m: m[2])
    made = set(byte_ids) | {m[2] for m in merges}
    specials = {s: i for s, i in encoder.items() if i not in made}
    for s in specials:
        if any(c not in byte_decoder for c in s) or s.startswith("<|"):
            continue
        raise TokenizerFileError(f"{encoder_json}: token {s!r} is neither a byte, a merge nor "
                                 f"special")
    try:
        return cls(merges, pattern=GPT2_PATTERN, special_tokens=specials, byte_ids=byte_ids,
                   whole_token_lookup=True)
    except ValueError as e:
        raise TokenizerFileError(f"{encoder_json} + {vocab_bpe}: {e}") from None


def _read_encoder(path):
    """encoder.json: an object of token string -> int id."""
    try:
        encoder = json.loads(_read_bytes(path).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path}: not a valid JSON document ({e.msg} at line "
                                 f"{e.lineno} column {e.colno})") from None
    if not isinstance(encoder, dict):
        raise TokenizerFileError(f"{path}: must be an object of token -> id, got "
                                 f"{type(encoder).__name__}")
    for token, i in encoder.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise TokenizerFileError(f"{path}: the id of token {token!r} must be an int, got "
                                     f"{type(i).__name__}")
    return encoder


def from_hf_json(cls, path, trust_pattern=False):
    """A byte-level BPE `tokenizer.json` of Hugging Face `tokenizers` (GPT-2 style: the BPE
    vocabulary spells bytes as GPT-2's printable characters, merges in rank order, a ByteLevel
    pre-tokenizer, after a Split by regex or with GPT-2's own regex). Special tokens are its
    added tokens marked special. Ids keep the file's. Anything else is refused by name."""
    from .patterns import GPT2_PATTERN, PATTERNS, onig_pattern

    try:
        doc = json.loads(_read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(f"{path}: not a JSON document ({e})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or \
            not isinstance(model.get("vocab"), dict):
        raise TokenizerFileError(f"{path}: not a byte-level BPE tokenizer.json (model.type must "
                                 f"be BPE with a vocab)")
    encoder = model["vocab"]
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    missing = [c for c in bytes_to_unicode().values() if c not in encoder]
    if missing:
        raise TokenizerFileError(f"{path}: the vocab lacks {len(missing)} of the 256 byte tokens "
                                 f"(not byte-level BPE?), e.g. {missing[0]!r}")
    byte_ids = [encoder[bytes_to_unicode()[b]] for b in range(256)]
    merges = []
    for k, m in enumerate(model.get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if not isinstance(pair, list) or len(pair) != 2:
            raise TokenizerFileError(f"{path}: model.merges[{k}] must be 'a b' or [a, b], got {m!r}")
        x, y = pair
        for t in (x, y, x + y):
            if t not in encoder:
                raise TokenizerFileError(f"{path}: model.merges[{k}]: token {t!r} is not in the vocab")
        merges.append((encoder[x], encoder[y], encoder[x + y]))
    merges.sort(key=lambda m: m[2])
    specials = {t["content"]: t["id"] for t in doc.get("added_tokens") or []
                if isinstance(t, dict) and t.get("special")}
    pattern = _hf_split_pattern(doc.get("pre_tokenizer"), path) or GPT2_PATTERN
    for name in PATTERNS.values():  # the exported form of a named pattern is that pattern
        if pattern in (name, onig_pattern(name)):
            pattern = name
    try:
        return cls(merges, pattern=pattern, special_tokens=specials, byte_ids=byte_ids,
                   whole_token_lookup=True, trust_pattern=trust_pattern)
    except ValueError as e:
        raise TokenizerFileError(f"{path}: {e}") from None


def _hf_split_pattern(pre, path):
    """The regex of a Split pre-tokenizer (inside a Sequence or alone); None for ByteLevel
    with its own (GPT-2) regex."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" \
        else [pre]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "Split":
            regex_ = (step.get("pattern") or {}).get("Regex")
            if not isinstance(regex_, str):
                raise TokenizerFileError(f"{path}: a Split pre-tokenizer without a Regex pattern")
            return regex_
    return None
