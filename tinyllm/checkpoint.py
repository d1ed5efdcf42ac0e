"""Checkpoint files: one file holding a JSON header and raw arrays, with a checksum.

Layout (all integers little-endian):

    b"TINYLLM-CKPT\\n"            magic, 13 bytes
    uint32 version, uint64 n       then n bytes of UTF-8 JSON: the metadata (config, tokenizer,
                                   step, RNG states, ...) and an index of the arrays
                                   {name: {dtype, shape, offset, nbytes}}
    array bytes                    each array's C-order bytes at its offset
    32 bytes                       SHA-256 of everything before it

Writing goes to a temporary file in the same folder, fsync, then os.replace: a crash or a
Ctrl-C during a save leaves the previous checkpoint as it was. Reading checks the magic,
the length and the checksum before trusting anything, and every problem is a
CheckpointError naming the file.
"""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from tinyllm.atomic import atomic_write

MAGIC = b"TINYLLM-CKPT\n"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, truncated, or not matching."""


def _write_chunk(f, data, h):
    """Write one piece and feed it to the checksum (one place, so tests can make it fail)."""
    f.write(data)
    h.update(data)


def save_checkpoint(path, meta, arrays):
    """Write `meta` (a JSON-able dict) and `arrays` (name -> NumPy array) to `path` atomically."""
    path = Path(path)
    index, offset = {}, 0
    blobs = []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        index[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset,
                       "nbytes": a.nbytes}
        offset += a.nbytes
        blobs.append(a)
    header = json.dumps({"meta": meta, "arrays": index}, separators=(",", ":")).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        h = hashlib.sha256()
        _write_chunk(f, MAGIC + struct.pack("<IQ", VERSION, len(header)), h)
        _write_chunk(f, header, h)
        for a in blobs:
            _write_chunk(f, memoryview(a.reshape(-1)).cast("B"), h)
        f.write(h.digest())
    return path


def load_checkpoint(path):
    """Read a checkpoint: (meta, arrays). Raises CheckpointError naming the file on any problem."""
    path = Path(path)

    def fail(what):
        raise CheckpointError(f"{path}: {what}")

    try:
        raw = path.read_bytes()
    except OSError as e:
        fail(f"cannot read checkpoint: {e.strerror or e}")
    head = len(MAGIC) + 12
    if len(raw) < head + 32 or not raw.startswith(MAGIC):
        fail("not a tinyllm checkpoint (bad magic) or truncated to almost nothing")
    version, n = struct.unpack("<IQ", raw[len(MAGIC):head])
    if version != VERSION:
        fail(f"unsupported checkpoint version {version} (this code reads {VERSION})")
    body, digest = raw[:-32], raw[-32:]
    if hashlib.sha256(body).digest() != digest:
        fail(f"checksum mismatch: the file is corrupt or truncated ({len(raw)} bytes)")
    try:
        doc = json.loads(raw[head:head + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"unreadable header: {e}")
    data = memoryview(raw)[head + n:-32]
    arrays = {}
    for name, spec in doc["arrays"].items():
        end = spec["offset"] + spec["nbytes"]
        if end > len(data):
            fail(f"array {name!r} runs past the end of the data")
        a = np.frombuffer(data[spec["offset"]:end], dtype=np.dtype(spec["dtype"]))
        arrays[name] = a.reshape(spec["shape"]).copy()
    return doc["meta"], arrays


def check_match(path, what, saved, expected):
    """Raise CheckpointError naming the file and every differing field of two dicts."""
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, expected {expected.get(k)!r}"
             for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
    if diffs:
        raise CheckpointError(f"{path}: {what} does not match: " + "; ".join(diffs))
