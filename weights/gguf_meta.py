"""Read a GGUF file's metadata (its key-value header), fast.

Why not the `gguf` package's GGUFReader: it builds a numpy view per item, and a tokenizer's vocab is
~100k items (49,152 tokens and 48,900 merges for the default model): 2.5-4 s on every start, for
what a plain struct walk over a memory map reads in ~0.1 s. GGUFReader still dequantizes the weights
at import (weights/gguf_import.py); this reads only the header, which is all the tokenizer needs.

The header (GGUF v2/v3, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
    "GGUF"  u32 version  u64 tensor_count  u64 kv_count
    kv_count x (string key, u32 value type, value)
A string is a u64 byte length and UTF-8 bytes; an array is a u32 element type, a u64 count and the
elements. Little-endian, unless the file was written big-endian (then its version reads byte-swapped,
as GGUFReader also detects). Values come back as GGUFReader's `contents()` gives them: ints, floats,
bools, strs, and lists of those.
"""
from __future__ import annotations

import mmap
import struct

# value type -> struct format of one scalar (8 = string and 9 = array are read by hand)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def read_gguf_metadata(path: str, prefix: str = "") -> dict:
    """{key: value} of every header entry whose key starts with `prefix` (all by default); the others
    are stepped over, not decoded. A file that is not GGUF, or is cut short: ValueError, one line."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, prefix)
    # ValueError: an empty file too; RecursionError: arrays nested thousands deep (real files nest none)
    except (OSError, ValueError, struct.error, KeyError, IndexError, RecursionError) as e:
        raise ValueError(f"{path}: GGUF header unreadable ({type(e).__name__}: {e})") from None


def _parse(buf, prefix: str) -> dict:
    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    end = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"  # a version is small either way
    u32, u64 = struct.Struct(end + "I"), struct.Struct(end + "Q")
    (n_kv,) = u64.unpack_from(buf, 16)  # past the magic, the version and the tensor count
    pos = 24

    def string(pos: int) -> tuple[int, int]:  # -> where its bytes start and end
        (n,) = u64.unpack_from(buf, pos)
        if pos + 8 + n > len(buf):
            raise ValueError("a string runs past the end of the file")
        return pos + 8, pos + 8 + n

    def value(kind: int, pos: int, keep: bool):  # -> (the value, or None when not kept; the next position)
        if kind == STRING:
            a, b = string(pos)
            return (buf[a:b].decode("utf-8") if keep else None), b
        if kind == ARRAY:
            (sub,), (count,) = u32.unpack_from(buf, pos), u64.unpack_from(buf, pos + 4)
            pos += 12
            if sub in _SCALARS:  # one unpack for the whole array
                fmt = struct.Struct(f"{end}{count}{_SCALARS[sub]}")
                return (list(fmt.unpack_from(buf, pos)) if keep else None), pos + fmt.size
            items = []
            for _ in range(count):  # strings (the vocab, the merges) or nested arrays
                item, pos = value(sub, pos, keep)
                items.append(item)
            return (items if keep else None), pos
        fmt = struct.Struct(end + _SCALARS[kind])  # an unknown type: KeyError, reported by the caller
        return (fmt.unpack_from(buf, pos)[0] if keep else None), pos + fmt.size

    out = {}
    for _ in range(n_kv):
        a, pos = string(pos)
        key = buf[a:pos].decode("utf-8")
        (kind,) = u32.unpack_from(buf, pos)
        keep = key.startswith(prefix)
        val, pos = value(kind, pos + 4, keep)
        if keep:
            out[key] = val
    return out
