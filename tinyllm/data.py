"""From text to training batches.

1. Documents: the built-in corpus (the English help texts that ship inside CPython, so every
   machine with Python has it), a named downloaded corpus (`tinyllm.corpora`), one text file,
   a JSON-lines file (one document per line: an object with a "text" string, the layout of
   common web corpora), or a folder of .txt and .jsonl files.
2. Split into train and validation by documents (about 10% of the characters validate). A
   corpus that cannot be split so (one big file such as tinyshakespeare) is split inside each
   document instead: its first 90% of characters train, the rest validate.
3. Tokenize each split into one flat array of token ids with `<|endoftext|>` after every
   document, stored as raw uint16 (uint32 for vocabularies over 65536) and read back through
   np.memmap. The files are cached under a key made of the corpus's content hash and the
   tokenizer's fingerprint, so the second run skips the work.
4. Batches: B windows of T + 1 consecutive tokens; x is the first T, y the last T (the next
   token at every position). Windows start at random offsets drawn from a generator seeded
   by (seed, batch number), or follow each other in order; either way batch k is a pure
   function of k, which makes resuming exact: the data position is just the batch count.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from tinyllm.atomic import atomic_write

FORMAT = 1  # bump when the token file layout changes: old caches are then ignored


# ---- documents ---------------------------------------------------------------------------

def builtin_documents():
    """The built-in corpus: (topic, text) for every help topic in `pydoc_data.topics`
    (about 0.5 MB of English prose and code about Python), sorted by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip it
        raise RuntimeError(
            "the built-in corpus needs pydoc_data.topics, which this Python lacks; "
            "pass --data PATH with a text file or a folder of .txt files") from e
    return [(name, topics[name].strip() + "\n") for name in sorted(topics)]


DOCUMENT_SUFFIXES = (".txt", ".jsonl")


def json_lines(path):
    """(lineno, "file:LINE", value) for every non-blank line of a JSON-lines file. Lines end at
    "\n" only (JSON strings may hold U+2028 and friends); a line that is not UTF-8 or not JSON
    raises ValueError naming the file and the line."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of "
                                 f"the line)") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                at = "" if e.msg.endswith(" at") else " at"  # "...starting at", "Expecting value"
                raise ValueError(f"{where}: invalid JSON ({e.msg}{at} column {e.colno})") \
                    from None
            yield lineno, where, value


def read_jsonl(path, name):
    """(name:line, text) for every line of a JSON-lines file: each line a JSON object with a
    "text" string (other fields are ignored; blank lines are skipped). A bad line raises
    ValueError naming the file, the line number and what is wrong."""
    docs = []
    for lineno, where, doc in json_lines(path):
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: expected a JSON object with a \"text\" string, got "
                             f"{_json_type(doc)}")
        if "text" not in doc:
            keys = ", ".join(map(repr, list(doc)[:8])) or "none"
            raise ValueError(f"{where}: the object has no \"text\" field (its keys: {keys})")
        if not isinstance(doc["text"], str):
            raise ValueError(f"{where}: \"text\" must be a string, got "
                             f"{_json_type(doc['text'])}")
        docs.append((f"{name}:{lineno}", doc["text"]))
    return docs


def _json_type(v):
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def read_text_file(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def list_corpus_files(folder):
    """(files, skipped): the .txt and .jsonl files under `folder`, recursively, in sorted path
    order, and the other files. Hidden files and folders (names starting with '.', such as
    .git) are neither read nor reported."""
    files, skipped = [], []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        (files if p.suffix.lower() in DOCUMENT_SUFFIXES else skipped).append(p)
    return files, skipped


def skipped_message(folder, skipped, limit=10):
    names = ", ".join(str(p.relative_to(folder)) for p in skipped[:limit])
    more = f", and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return (f"{folder}: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that "
            f"{'are' if len(skipped) > 1 else 'is'} not .txt or .jsonl: {names}{more}")


def read_documents(path, quiet=False):
    """(name, text) pairs from a file or a folder.

    A .jsonl file gives one document per line (`read_jsonl`); any other file is one document
    of UTF-8 text. A folder gives the documents of its .txt and .jsonl files, found
    recursively, in sorted path order; the other files in it are skipped and listed in one
    line on stderr (unless `quiet`)."""
    path = Path(path)
    if path.is_file():
        files, skipped = [path], []
    elif path.is_dir():
        files, skipped = list_corpus_files(path)
        if not files:
            extra = f" ({skipped_message(path, skipped)})" if skipped else ""
            raise FileNotFoundError(f"{path}: folder has no .txt or .jsonl files{extra}")
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    if skipped and not quiet:
        print(f"note: {skipped_message(path, skipped)}", file=sys.stderr)
    docs = []
    for f in files:
        name = f.name if f == path else str(f.relative_to(path))
        if f.suffix.lower() == ".jsonl":
            docs += read_jsonl(f, name)
        else:
            docs.append((name, read_text_file(f)))
    if not any(text for _, text in docs):
        raise ValueError(f"{path}: the corpus is empty")
    return docs


def load_corpus(data=None):
    """Documents of the built-in corpus (`data` None or 'builtin'), of a named corpus from
    `tinyllm.corpora` (e.g. 'tinyshakespeare', once `tinyllm data get` fetched it), or of a
    path (a file or folder of that name is written as a path: ./tinyshakespeare)."""
    if data is None or str(data) == "builtin":
        return builtin_documents()
    from tinyllm import corpora

    if isinstance(data, str) and data in corpora.CORPORA:
        return read_documents(corpora.corpus_path(data))
    return read_documents(data)


def corpus_hash(docs):
    """SHA-256 over every document's name and text: the cache key of the corpus."""
    h = hashlib.sha256()
    for name, text in docs:
        for part in (name, text):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def split_documents(docs, val_fraction=0.1):
    """Deterministic train/validation split by documents; returns (train_docs, val_docs).

    Documents are visited in the order of the SHA-256 of their names (arbitrary but fixed,
    so validation is a sample of the whole corpus, not its alphabetical tail) and go to
    validation until it holds `val_fraction` of the characters; one that would overshoot
    the target by half again is skipped. Order within each split is the corpus order.
    When no document fits (e.g. one big file such as tinyshakespeare), each document is cut
    instead: its first (1 - val_fraction) of characters train, the rest validate.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    total = sum(len(text) for _, text in docs)
    target = val_fraction * total
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(
        f"{i}:{docs[i][0]}".encode("utf-8", "surrogatepass")).hexdigest())
    chosen, size = set(), 0
    for i in order:
        if size >= target:
            break
        n = len(docs[i][1])
        if size + n <= 1.5 * target and len(chosen) < len(docs) - 1:
            chosen.add(i)
            size += n
    if chosen and size >= 0.5 * target:
        train = [d for i, d in enumerate(docs) if i not in chosen]
        val = [d for i, d in enumerate(docs) if i in chosen]
        return train, val
    train, val = [], []
    for name, text in docs:
        cut = int(len(text) * (1 - val_fraction))
        train.append((name, text[:cut]))
        val.append((name, text[cut:]))
    return train, val


# ---- tokenizing --------------------------------------------------------------------------

def token_dtype(vocab_size):
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def tokenizer_fingerprint(tokenizer):
    """A SHA-256 that changes whenever the tokenizer would encode differently."""
    body = tokenizer._body()
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


class Progress:
    """One status line on stderr, rewritten at most every `every` seconds."""

    def __init__(self, label, total, unit="MB", scale=1e6, every=0.5, stream=None, enabled=True):
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.every, self.stream, self.enabled = every, stream or sys.stderr, enabled
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0

    def update(self, n):
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self._print(now, end="\r")

    def close(self):
        if self.enabled:
            self._print(time.perf_counter(), end="\n")

    def _print(self, now, end):
        dt = max(now - self.t0, 1e-9)
        pct = 100 * self.done / max(self.total, 1)
        rate = self.done / self.scale / dt
        left = (self.total - self.done) / self.scale / rate if rate > 0 else 0
        print(f"{self.label}: {pct:5.1f}% {self.done / self.scale:.2f}/{self.total / self.scale:.2f} "
              f"{self.unit}, {rate:.2f} {self.unit}/s, {dt:.0f}s elapsed, ~{left:.0f}s left",
              end=end, file=self.stream, flush=True)


def _chunks(text, size=1 << 18):
    """Cut a long text into pieces of about `size` characters, each cut just after a newline
    that is followed by a non-space character: no pre-tokenizer piece spans such a point,
    so encoding the pieces one by one gives the same tokens as encoding the whole."""
    start = 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        yield text[start:cut]
        start = cut
    yield text[start:]


def tokenize_documents(docs, tokenizer, label="tokenizing", progress=True):
    """One flat token array for `docs`: each document's tokens then `<|endoftext|>`."""
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    total = sum(len(text) for _, text in docs)
    bar = Progress(label, total, unit="M chars", enabled=progress)
    # The cut points of `_chunks` are safe for the named split patterns; a custom pattern may
    # match across them, so its documents are encoded whole.
    from tinyllm.tokenizer.patterns import pattern_name

    size = 1 << 18 if pattern_name(tokenizer.pattern) else None
    parts = []
    for _, text in docs:
        for chunk in (_chunks(text, size) if size else [text]):
            parts.append(np.asarray(tokenizer.encode_ordinary(chunk), dtype=dtype))
            bar.update(len(chunk))
        if eot is not None:
            parts.append(np.asarray([eot], dtype=dtype))
    bar.close()
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def default_cache_dir():
    """$TINYLLM_CACHE, else $XDG_CACHE_HOME/tinyllm, else ~/.cache/tinyllm."""
    if os.environ.get("TINYLLM_CACHE"):
        return Path(os.environ["TINYLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinyllm"


def _write_atomic(path, data):
    """Write bytes to `path` all at once or not at all."""
    with atomic_write(path) as f:
        f.write(data)


class TokenDataset:
    """The tokenized train and validation splits (memory-mapped) and what made them."""

    def __init__(self, folder):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        self.meta = json.loads(meta_path.read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {}
        for split in ("train", "val"):
            path = self.folder / f"{split}.bin"
            n = self.meta[f"{split}_tokens"]
            if path.stat().st_size != n * dtype.itemsize:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, meta.json says "
                                 f"{n} tokens of {dtype} (truncated or corrupt cache; delete it)")
            self.splits[split] = (np.memmap(path, dtype=dtype, mode="r", shape=(n,))
                                  if n else np.zeros(0, dtype))
        self.train, self.val = self.splits["train"], self.splits["val"]

    def __repr__(self):
        return (f"TokenDataset({self.folder}, train={len(self.train):,} tokens, "
                f"val={len(self.val):,} tokens, dtype={self.meta['dtype']})")


def prepare_dataset(docs, tokenizer, cache_dir=None, val_fraction=0.1, progress=True):
    """Split, tokenize and cache `docs`; returns a TokenDataset (cached when seen before)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(json.dumps(
        [FORMAT, corpus_hash(docs), tokenizer_fingerprint(tokenizer), val_fraction]
    ).encode()).hexdigest()
    folder = cache_dir / "tokens" / key[:20]
    if (folder / "meta.json").exists():
        return TokenDataset(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = split_documents(docs, val_fraction)
    t0 = time.perf_counter()
    meta = {"format": FORMAT, "key": key, "vocab_size": tokenizer.vocab_size,
            "dtype": token_dtype(tokenizer.vocab_size).name, "eot_id": tokenizer.eot_id,
            "val_fraction": val_fraction, "corpus_sha256": corpus_hash(docs)}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens = tokenize_documents(split_docs, tokenizer, f"tokenizing {split}", progress)
        _write_atomic(folder / f"{split}.bin", tokens.tobytes())
        meta[f"{split}_tokens"] = int(tokens.size)
        meta[f"{split}_documents"] = len(split_docs)
        meta[f"{split}_chars"] = sum(len(t) for _, t in split_docs)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    _write_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode())  # last: the marker
    return TokenDataset(folder)


# ---- batches ---------------------------------------------------------------------------------

class Batches:
    """Fixed-length windows of a token array: `get(k)` is batch number k, (x, y) int64 arrays
    of shape (batch_size, block_size) with y[:, t] = the token after x[:, t].

    order='random': window starts drawn uniformly from a generator seeded by (seed, k);
    order='sequential': consecutive windows, wrapping around at the end.
    """

    def __init__(self, tokens, batch_size, block_size, seed=0, order="random"):
        if order not in ("random", "sequential"):
            raise ValueError(f"order must be 'random' or 'sequential', not {order!r}")
        if len(tokens) < block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for windows of "
                             f"{block_size} + 1 tokens (shrink block_size or add data)")
        self.tokens, self.batch_size, self.block_size = tokens, int(batch_size), int(block_size)
        self.seed, self.order = int(seed), order
        self.n_starts = len(tokens) - self.block_size  # valid starts: 0 .. len - T - 1
        self._offsets = np.arange(self.block_size + 1)

    def starts(self, k):
        B = self.batch_size
        if self.order == "random":
            return np.random.default_rng([self.seed, k]).integers(0, self.n_starts, size=B)
        first = (k * B + np.arange(B)) * self.block_size
        return first % self.n_starts

    def get(self, k, rows=slice(None)):
        """Batch k, or only its `rows` (a slice: one rank's share, see shard_rows)."""
        windows = np.asarray(self.tokens[self.starts(k)[rows, None] + self._offsets],
                             dtype=np.int64)
        return windows[:, :-1], windows[:, 1:]

    __getitem__ = get


def shard_rows(n, rank, world_size):
    """The rows of a batch of `n` that rank `rank` of `world_size` trains on (data parallelism):
    a contiguous slice; the ranks' slices, in rank order, cover the batch once, and their
    sizes differ by at most one."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def eval_windows(tokens, block_size, max_windows):
    """Fixed evaluation windows: up to `max_windows` starts spread evenly over the tokens
    (non-overlapping when there is room), the same every time, so evaluations compare."""
    n_starts = len(tokens) - block_size
    if n_starts <= 0:
        raise ValueError(f"{len(tokens)} validation tokens are too few for windows of "
                         f"{block_size} + 1 tokens")
    n = int(min(max_windows, max(1, n_starts // block_size)))
    return np.linspace(0, n_starts - 1, n).astype(np.int64)


def windows_at(tokens, starts, block_size):
    """(x, y) for windows beginning at `starts`."""
    w = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)
    return w[:, :-1], w[:, 1:]


def pad_right(seqs, fill, dtype=np.int64):
    """An (N, T) array of N sequences, each at the start of its row and filled with `fill` to
    the longest one's length T (the padding of fine-tuning batches: one example per row)."""
    out = np.full((len(seqs), max(len(s) for s in seqs)), fill, dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out
