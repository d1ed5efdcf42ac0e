"""Read and write .safetensors files with NumPy alone.

The format: an 8-byte little-endian unsigned length N, then N bytes of JSON

    {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
     "__metadata__": {"key": "value"}}   (optional, strings only)

then the raw little-endian bytes of every tensor, [begin, end) counted from the end of the
header. BF16 is read without extra packages: a bfloat16 is the top half of a float32, so
shifting the 16 bits left by 16 gives the float32 with the same value.
"""

import json
import os
import struct

import numpy as np

from tinyllm.atomic import atomic_write

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v).newbyteorder("<"): k for k, v in _DTYPES.items()}


def _bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def read_header(path):
    """The JSON header of a .safetensors file and the byte offset where the data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short to be a .safetensors file")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    return header, 8 + n


def load_file(path):
    """name -> np.ndarray for every tensor in the file (BF16 comes back as float32)."""
    header, start = read_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        buf = bytearray(f.read())  # writable, so the arrays are too (no copy)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype != "BF16" and dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        item = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * item or end > len(buf) or begin < 0:
            raise ValueError(
                f"{path}: tensor {name!r} of dtype {dtype}, shape {list(shape)} does not fit its "
                f"data_offsets [{begin}, {end}] (data section of {len(buf)} bytes)"
            )
        if dtype == "BF16":
            arr = _bf16_to_f32(np.frombuffer(buf, "<u2", count, begin)).reshape(shape)
        else:
            arr = np.frombuffer(buf, np.dtype(_DTYPES[dtype]).newbyteorder("<"), count, begin)
            arr = arr.reshape(shape)
            if arr.dtype.byteorder == ">":  # only on big-endian machines
                arr = arr.astype(arr.dtype.newbyteorder("="))
        out[name] = arr
    return out


def save_file(tensors, path, metadata=None):
    """Write name -> array to `path` atomically (a temporary file in the same folder, renamed).

    Arrays of any supported dtype; an ml_dtypes bfloat16 array is written as BF16.
    """
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype.name == "bfloat16":
            code, raw = "BF16", np.ascontiguousarray(a).view(np.uint16).astype("<u2")
        else:
            key = a.dtype.newbyteorder("<")
            if key not in _NAMES:
                raise ValueError(f"save_file: tensor {name!r} has unsupported dtype {a.dtype}")
            code, raw = _NAMES[key], np.ascontiguousarray(a, dtype=key)
        data = raw.tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so the data starts 8-byte aligned
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)
