"""The byte-level BPE tokenizer: encode, decode, save and load.

A text is split into pieces by a regex (`patterns.py`); each piece's UTF-8 bytes start as one
token per byte and are merged pairwise, always the adjacent pair whose merge was learned first
(lowest rank), leftmost on ties, until no adjacent pair has a merge. Special tokens (e.g.
`<|endoftext|>`) are matched before the split and never take part in merges.

Ids. A merge `(a, b) -> c` has rank `c`: merges learned later get larger ids, so "lowest rank"
is "smallest new id" and one dict `merges[(a, b)] = c` serves as both the rank and the result.
A trained tokenizer has ids 0-255 for the raw bytes, 256.. for merges in the order learned and
the special tokens after them. A vocabulary loaded from OpenAI's files keeps its file's ids
(the rank): there the single bytes are not ids 0-255 in byte order, so the id of byte `b` is
`byte_ids[b]`, a table of 256 ids.

A tokenizer file is data, never code: its split pattern is used only when it is a named one
or passes the safety check of `patterns.check_pattern` (or the caller passes
`trust_pattern=True`), and every key is checked for presence and type before use.

OpenAI vocabularies are encoded the way tiktoken does it: a piece whose whole bytes are a token
is that token (tiktoken's fast path; `whole_token_lookup=True`), otherwise it is merged by rank.
"""

import hashlib
import heapq
import json
import os
import sys
from itertools import chain, repeat

import regex

from tinyllm.atomic import atomic_write

from .patterns import PatternError, ascii_findall, check_pattern, pattern_name, split_function

FORMAT_NAME = "tinyllm-bpe"
FORMAT_VERSION = 1
ENDOFTEXT = "<|endoftext|>"

# Pieces of up to this many bytes are merged with a simple rescan per merge (quadratic but
# tiny); longer ones with a heap over a linked list, O(n log n) ("a" * 100_000).
_SHORT_PIECE = 48
# The piece -> ids cache is cleared when it grows past this many entries.
_CACHE_LIMIT = 1 << 20
_NO_MERGE = sys.maxsize  # the rank of a pair that has no merge


class TokenizerFileError(ValueError):
    """A saved tokenizer file that cannot be loaded: names the file and what is wrong."""


def merge_pair(ids, pair, new_id):
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    a, b = pair
    out = []
    i, n = 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def bpe_short(ids, merges):
    """Merge `ids` (a list, modified) by rank, rescanning the pairs after each merge: for short
    pieces. Each step merges the leftmost adjacent pair of lowest rank, as tiktoken does."""
    get = merges.get
    while len(ids) >= 2:
        ranks = list(map(get, zip(ids, ids[1:]), repeat(_NO_MERGE)))
        rank = min(ranks)
        if rank == _NO_MERGE:
            break
        i = ranks.index(rank)
        ids[i:i + 2] = [rank]  # the merged token's id is its rank
    return ids


def bpe_long(ids, merges):
    """Merge `ids` by rank with a heap of (rank, position) over a doubly linked list.

    Entries whose position was merged away or whose pair changed are skipped when popped
    (lazy deletion); positions keep their left-to-right order, so ties go to the leftmost."""
    n = len(ids)
    tok = list(ids)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        rank = merges.get((tok[i], tok[i + 1]))
        if rank is not None:
            heap.append((rank, i))
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        if tok[i] is None or j >= n or merges.get((tok[i], tok[j])) != rank:
            continue  # stale entry
        tok[i] = rank  # the merged token's id is its rank
        tok[j] = None
        k = nxt[j]
        nxt[i] = k
        if k < n:
            prv[k] = i
            r = merges.get((rank, tok[k]))
            if r is not None:
                heapq.heappush(heap, (r, i))
        p = prv[i]
        if p >= 0:
            r = merges.get((tok[p], rank))
            if r is not None:
                heapq.heappush(heap, (r, p))
    return [t for t in tok if t is not None]


def _normalize_specials(special_tokens, first_id):
    """None -> {'<|endoftext|>': first_id}; a list of strings -> consecutive ids in that order;
    a dict str -> id is taken as is."""
    if special_tokens is None:
        special_tokens = [ENDOFTEXT]
    if isinstance(special_tokens, str):
        special_tokens = [special_tokens]
    if isinstance(special_tokens, dict):
        for s in special_tokens:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special tokens must be non-empty strings, got {s!r}")
        return {s: int(i) for s, i in special_tokens.items()}
    if isinstance(special_tokens, (set, frozenset)):
        special_tokens = sorted(special_tokens)
    out = {}
    for s in special_tokens:
        if not isinstance(s, str) or not s:
            raise ValueError(f"special tokens must be non-empty strings, got {s!r}")
        if s not in out:
            out[s] = first_id + len(out)
    return out


class Tokenizer:
    """A byte-level BPE tokenizer. Build one with `Tokenizer.train`, `Tokenizer.bytes`,
    `Tokenizer.load`, `Tokenizer.from_tiktoken` or `Tokenizer.from_gpt2`."""

    def __init__(self, merges=(), pattern="gpt2", special_tokens=None, byte_ids=None,
                 whole_token_lookup=False, trust_pattern=False):
        """merges: (a, b, new_id) triples with new_id increasing (the rank order), or (a, b)
        pairs, which get ids 256, 257, ...; byte_ids: the id of each byte (default: the byte
        value); special_tokens: see `_normalize_specials`, ids default to after the merges;
        pattern: a name ('gpt2', 'gpt4', 'o200k', ...) or a regex, which must pass
        `check_pattern` (PatternError otherwise) unless `trust_pattern` is true."""
        self.pattern = check_pattern(pattern, trust=trust_pattern)
        self.trust_pattern = bool(trust_pattern)
        self.byte_ids = list(range(256)) if byte_ids is None else [int(i) for i in byte_ids]
        if len(self.byte_ids) != 256 or len(set(self.byte_ids)) != 256:
            raise ValueError("byte_ids must give 256 distinct ids")
        self.merges = {}  # (a, b) -> new id == rank
        vocab = {i: bytes([b]) for b, i in enumerate(self.byte_ids)}
        last = -1
        for k, m in enumerate(merges):
            a, b, new = (m[0], m[1], 256 + k) if len(m) == 2 else m
            a, b, new = int(a), int(b), int(new)
            if a not in vocab or b not in vocab:
                raise ValueError(f"merge {k} ({a}, {b}) uses an id not defined before it")
            if new in vocab or new <= last or (a, b) in self.merges:
                raise ValueError(f"merge {k} ({a}, {b}) -> {new}: ids must be new and increasing")
            self.merges[(a, b)] = new
            vocab[new] = vocab[a] + vocab[b]
            last = max(last, new)
        self.special_tokens = _normalize_specials(special_tokens, max(vocab) + 1)
        for s, i in self.special_tokens.items():
            if i in vocab:
                raise ValueError(f"special token {s!r} id {i} collides with another token")
            vocab[i] = s.encode("utf-8")
        self._decoder = vocab  # id -> bytes, specials included
        self.inverse_special_tokens = {i: s for s, i in self.special_tokens.items()}
        self.whole_token_lookup = bool(whole_token_lookup)
        self._whole = {}
        if self.whole_token_lookup:
            self._whole = {vocab[i]: i for i in self.byte_ids}
            self._whole.update((vocab[i], i) for i in self.merges.values())
        self._identity_bytes = self.byte_ids == list(range(256))
        self._findall = split_function(self.pattern)
        self._ascii_findall = ascii_findall(self.pattern)
        # No merges and a named pattern (whose pieces tile any text): the ids are the bytes.
        self._bytes_only = (not self.merges and self._identity_bytes
                            and pattern_name(self.pattern) is not None)
        self._special_res = {}
        self._cache = {}

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, pattern="gpt2", special_tokens=None, verbose=False,
              trust_pattern=False):
        """Learn `vocab_size - 256` merges from `text` (a str, or an iterable of str such as an
        open file), then register the special tokens after them (default `<|endoftext|>`), so
        `tok.vocab_size == vocab_size + len(special_tokens)`. `vocab_size=256`: bytes only.
        Ties between equally frequent pairs go to the smallest (left id, right id). A custom
        `pattern` is checked before any work (see `__init__`)."""
        from .train import train_merges

        pattern = check_pattern(pattern, trust=trust_pattern)
        specials = _normalize_specials(special_tokens, 0)
        merges = train_merges(text, vocab_size, pattern, special_tokens=list(specials),
                              verbose=verbose)
        return cls(merges, pattern=pattern, special_tokens=list(specials),
                   trust_pattern=trust_pattern)

    @classmethod
    def bytes(cls, special_tokens=None):
        """A tokenizer with no merges: one token per byte, then the special tokens."""
        return cls((), special_tokens=special_tokens)

    @classmethod
    def from_tiktoken(cls, path, pattern=None, special_tokens=None, trust_pattern=False):
        """Load a tiktoken rank file (`r50k_base.tiktoken`, `cl100k_base.tiktoken`, ...); ids
        equal tiktoken's. Pattern and special tokens default from the file name when it is a
        known one, else to the GPT-2 pattern and `<|endoftext|>` after the last rank."""
        from .openai import from_tiktoken

        return from_tiktoken(cls, path, pattern=pattern, special_tokens=special_tokens,
                             trust_pattern=trust_pattern)

    @classmethod
    def from_gpt2(cls, encoder_json, vocab_bpe):
        """Load GPT-2's original `encoder.json` + `vocab.bpe` (ids equal r50k_base's)."""
        from .openai import from_gpt2

        return from_gpt2(cls, encoder_json, vocab_bpe)

    @classmethod
    def from_hf_json(cls, path, trust_pattern=False):
        """Load a Hugging Face byte-level BPE `tokenizer.json` (what `tinyllm export` writes,
        and GPT-2-style checkpoints ship); ids equal the file's."""
        from .openai import from_hf_json

        return from_hf_json(cls, path, trust_pattern=trust_pattern)

    # ---- properties -------------------------------------------------------------------------

    @property
    def vocab_size(self):
        """One more than the largest id (cl100k_base has unused ids below its specials)."""
        return max(self._decoder) + 1

    @property
    def eot_id(self):
        """The id of `<|endoftext|>`, or None when it is not registered."""
        return self.special_tokens.get(ENDOFTEXT)

    @property
    def vocab(self):
        """id -> bytes, special tokens included (a copy)."""
        return dict(self._decoder)

    def token_bytes(self, i):
        return self._decoder[i]

    # ---- encoding ---------------------------------------------------------------------------

    def _encode_piece(self, piece):
        b = piece.encode("utf-8", "surrogatepass")
        whole = self._whole.get(b)
        if whole is not None:
            return [whole]
        ids = list(b) if self._identity_bytes else [self.byte_ids[x] for x in b]
        if len(ids) < 2:
            return ids
        if len(ids) <= _SHORT_PIECE:
            return bpe_short(ids, self.merges)
        return bpe_long(ids, self.merges)

    def encode_ordinary(self, text):
        """Encode `text` with special-token strings treated as ordinary text."""
        if self._bytes_only:
            return list(text.encode("utf-8", "surrogatepass"))
        if self._ascii_findall is not None and text.isascii():
            pieces = self._ascii_findall(text)
        else:
            pieces = self._findall(text)
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        try:
            # Fast path: every piece seen before.
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))
        except KeyError:
            pass
        encode_piece = self._encode_piece
        whole = self._whole
        for piece in set(pieces).difference(cache):
            i = whole.get(piece.encode("utf-8", "surrogatepass")) if whole else None
            cache[piece] = [i] if i is not None else encode_piece(piece)
        return list(chain.from_iterable(map(cache.__getitem__, pieces)))

    def _special_re(self, specials):
        key = frozenset(specials)
        r = self._special_res.get(key)
        if r is None:
            # Longest first, so that a special token that is a prefix of another loses.
            alts = sorted(specials, key=lambda s: (-len(s), s))
            r = regex.compile("|".join(regex.escape(s) for s in alts))
            self._special_res[key] = r
        return r

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Encode `text`, with tiktoken's handling of special-token strings in it: by default a
        special token's text raises ValueError; `allowed_special` ("all" or a set) encodes it as
        the special id; `disallowed_special=()` encodes the ones not allowed as ordinary text."""
        if allowed_special == "all":
            allowed_special = set(self.special_tokens)
        else:
            allowed_special = set(allowed_special)
        unknown = allowed_special - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens: {sorted(unknown)}")
        if disallowed_special == "all":
            disallowed_special = set(self.special_tokens) - allowed_special
        disallowed_special = set(disallowed_special)
        if disallowed_special:
            match = self._special_re(disallowed_special).search(text)
            if match:
                token = match.group()
                raise ValueError(
                    f"Encountered text corresponding to disallowed special token {token!r}.\n"
                    f"To encode it as the special token, pass allowed_special={{{token!r}}} "
                    f"(or 'all'); to encode it as ordinary text, pass disallowed_special=()."
                )
        if not allowed_special:
            return self.encode_ordinary(text)
        ids = []
        start = 0
        for m in self._special_re(allowed_special).finditer(text):
            ids += self.encode_ordinary(text[start:m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_batch(self, texts, allowed_special=frozenset(), disallowed_special="all"):
        """`encode` each text of a list (one process; the piece cache is shared)."""
        return [self.encode(t, allowed_special=allowed_special,
                            disallowed_special=disallowed_special) for t in texts]

    # ---- decoding ---------------------------------------------------------------------------

    def decode_bytes(self, ids):
        """The raw bytes of `ids` (a special token gives its text's UTF-8)."""
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"invalid token id {e.args[0]!r} (vocab_size {self.vocab_size})") \
                from None
        except TypeError:
            bad = next(i for i in ids if not isinstance(i, int) or i not in self._decoder)
            raise ValueError(f"invalid token id {bad!r}") from None

    def decode(self, ids, errors="replace"):
        """The text of `ids`; bytes that are not valid UTF-8 (a token sequence cut inside a
        character) become U+FFFD with the default errors='replace'."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # ---- saving and loading -----------------------------------------------------------------

    def _body(self):
        merges = [[a, b, c] for (a, b), c in sorted(self.merges.items(), key=lambda kv: kv[1])]
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern_name": pattern_name(self.pattern),
            "pattern": self.pattern,
            "byte_ids": None if self._identity_bytes else self.byte_ids,
            "whole_token_lookup": self.whole_token_lookup,
            "merges": merges,
            "special_tokens": self.special_tokens,
            "counts": {"merges": len(merges), "special_tokens": len(self.special_tokens),
                       "vocab_size": self.vocab_size},
        }

    @staticmethod
    def _checksum(body):
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canon.encode("ascii")).hexdigest()

    def to_json(self):
        """The tokenizer as one JSON document (format version, pattern, merges, special tokens,
        counts and a SHA-256 of the rest): what `save` writes."""
        body = self._body()
        doc = dict(body, sha256=self._checksum(body))
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":")) + "\n"

    def save(self, path):
        """Write `to_json()` to `path` atomically (a temporary file in the same directory,
        fsync, then rename over `path`)."""
        with atomic_write(path, "w", encoding="ascii") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path, trust_pattern=False):
        """Load a file written by `save`; a corrupt, truncated or ill-typed one raises
        TokenizerFileError naming the file and the problem, and so does a custom split pattern
        that fails `check_pattern` unless `trust_pattern` is true."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise TokenizerFileError(f"{path}: cannot read: {e.strerror or e}") from None
        return cls.from_json(raw, source=path, trust_pattern=trust_pattern)

    @classmethod
    def from_json(cls, raw, source="<json>", trust_pattern=False):
        """The tokenizer from `to_json()`'s text (str or bytes); errors name `source`."""

        def fail(what):
            raise TokenizerFileError(f"{source}: {what}")

        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        if not raw.strip():
            fail("empty file")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            fail(f"not UTF-8 text ({e.reason} at byte {e.start})")
        except json.JSONDecodeError as e:
            fail(f"not a valid JSON document, truncated or corrupt ({e.msg} at line {e.lineno} "
                 f"column {e.colno})")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            fail(f"not a tinyllm tokenizer file (format field is not {FORMAT_NAME!r})")
        if not _is_int(doc.get("version")) or doc["version"] != FORMAT_VERSION:
            fail(f"unsupported format version {doc.get('version')!r} (this code reads "
                 f"{FORMAT_VERSION})")
        checksum = doc.pop("sha256", None)
        if checksum is None:
            fail("missing sha256 checksum")
        if not isinstance(checksum, str):
            fail(f"key 'sha256' must be a str, got {_type_name(checksum)}")
        if cls._checksum(doc) != checksum:
            fail("checksum mismatch: the file was modified or corrupted")
        problem = _doc_problem(doc)
        if problem:
            fail(problem)
        counts = doc["counts"]
        if len(doc["merges"]) != counts["merges"]:
            fail(f"{len(doc['merges'])} merges, header says {counts['merges']}")
        if len(doc["special_tokens"]) != counts["special_tokens"]:
            fail(f"{len(doc['special_tokens'])} special tokens, header says "
                 f"{counts['special_tokens']}")
        try:
            tok = cls(doc["merges"], pattern=doc["pattern"], special_tokens=doc["special_tokens"],
                      byte_ids=doc["byte_ids"], whole_token_lookup=doc["whole_token_lookup"],
                      trust_pattern=trust_pattern)
        except PatternError as e:
            fail(str(e))
        except ValueError as e:
            fail(f"invalid contents: {e}")
        if tok.vocab_size != counts["vocab_size"]:
            fail(f"vocab size {tok.vocab_size}, header says {counts['vocab_size']}")
        return tok

    def save_vocab(self, path):
        """A human-readable dump, one token per line: id, its bytes rendered printable, and for
        merged tokens the pair it was merged from. For inspection only; `load` does not read it."""
        parents = {c: (a, b) for (a, b), c in self.merges.items()}
        lines = []
        for i in sorted(self._decoder):
            line = f"{i}\t[{render_token(self._decoder[i])}]"
            if i in parents:
                a, b = parents[i]
                line += (f"\t<- [{render_token(self._decoder[a])}][{render_token(self._decoder[b])}]"
                         f" ({a} {b})")
            elif i in self.inverse_special_tokens:
                line += "\tspecial"
            lines.append(line)
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def __repr__(self):
        name = pattern_name(self.pattern) or "custom"
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"pattern={name}, special_tokens={list(self.special_tokens)})")


def _type_name(v):
    """A JSON value's type as Python names it (None for null)."""
    return "None" if v is None else type(v).__name__


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _doc_problem(doc):
    """What is missing or ill-typed in a tokenizer file's document, or None: every key the
    loader reads is checked here, so that a bad file is a message, not a traceback."""
    for key in ("pattern", "merges", "special_tokens", "byte_ids", "whole_token_lookup",
                "counts"):
        if key not in doc:
            return f"missing key {key!r}"
    if not isinstance(doc["pattern"], str):
        return f"key 'pattern' must be a str, got {_type_name(doc['pattern'])}"
    if doc.get("pattern_name") is not None and not isinstance(doc["pattern_name"], str):
        return f"key 'pattern_name' must be a str or null, got {_type_name(doc['pattern_name'])}"
    merges = doc["merges"]
    want = "a list of [int, int, int]"
    if not isinstance(merges, list):
        return f"key 'merges' must be {want}, got {_type_name(merges)}"
    for k, m in enumerate(merges):
        if not (isinstance(m, list) and len(m) == 3 and all(map(_is_int, m))):
            return f"key 'merges' must be {want}, item {k} is {json.dumps(m)[:60]}"
    specials = doc["special_tokens"]
    if not isinstance(specials, dict):
        return f"key 'special_tokens' must be an object of str -> int, got {_type_name(specials)}"
    for s, i in specials.items():
        if not _is_int(i):
            return (f"key 'special_tokens' must be an object of str -> int, {s!r} is "
                    f"{_type_name(i)}")
    byte_ids = doc["byte_ids"]
    if byte_ids is not None and not (isinstance(byte_ids, list) and len(byte_ids) == 256
                                     and all(map(_is_int, byte_ids))):
        what = (f"a list of {len(byte_ids)} items" if isinstance(byte_ids, list)
                else _type_name(byte_ids))
        return f"key 'byte_ids' must be null or a list of 256 ints, got {what}"
    if not isinstance(doc["whole_token_lookup"], bool):
        return (f"key 'whole_token_lookup' must be a bool, got "
                f"{_type_name(doc['whole_token_lookup'])}")
    counts = doc["counts"]
    if not isinstance(counts, dict):
        return f"key 'counts' must be an object, got {_type_name(counts)}"
    for key in ("merges", "special_tokens", "vocab_size"):
        if key not in counts:
            return f"missing key 'counts.{key}'"
        if not _is_int(counts[key]):
            return f"key 'counts.{key}' must be an int, got {_type_name(counts[key])}"
    return None


def render_token(b):
    """Token bytes as readable text: valid UTF-8 shown as is, control characters and invalid
    bytes escaped."""
    s = b.decode("utf-8", errors="backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in s)
