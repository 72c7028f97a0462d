"""Damage a tensor file the way a bad disk or a bad copy would: one flipped bit inside a weight."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path


def flip_float_bit(path: Path, index: int = 1000) -> str:
    """Flip one bit of float32 number ``index`` in the largest tensor record of a torch file, in place.

    The bit is the lowest of the float's second byte (little-endian): the value changes by
    about 3e-5 of itself, small enough to go unnoticed in a loss. torch stores each tensor
    uncompressed in its own zip record, so the record's bytes sit at a fixed offset after
    its local header. Returns the record's name.
    """
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith(".pkl")),
                   key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= 4 * (index + 1), info
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
    data = info.header_offset + 30 + name_len + extra_len
    blob[data + 4 * index + 1] ^= 0x01
    path.write_bytes(bytes(blob))
    return info.filename
