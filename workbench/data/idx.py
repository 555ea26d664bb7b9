"""Read and write IDX files (the MNIST / Fashion-MNIST container), plain or gzip-compressed.

An IDX file is a big-endian header ``0x00 0x00 <type> <ndim>``, ``ndim`` 32-bit sizes, then the
array in C order. Only unsigned bytes (type ``0x08``) occur in the MNIST family and only they are
supported: images are ``(N, 28, 28)`` after a 16-byte header, labels ``(N,)`` after an 8-byte one.
The header is parsed rather than skipped, so a truncated or foreign file is refused by name.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np

_UBYTE = 0x08


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """The uint8 array stored in IDX file ``path`` (``.gz`` decompressed on the fly), read-only.

    Raises ``ValueError`` naming the file when the header is not an unsigned-byte IDX header or
    the payload is shorter or longer than the header says.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError when cut short
        raise ValueError(f"{path}: not a readable IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {data[:4].hex() or 'empty'})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path}: IDX header cut short ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:offset])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: IDX payload holds {len(data) - offset} bytes, header {shape} says {expected}")
    array = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)
    array.setflags(write=False)
    return array


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 ``array`` as an IDX file; ``.gz`` paths are compressed reproducibly.

    The gzip header carries no file name and a zero timestamp, so the same array gives the same
    bytes on every run (for the same zlib). The file is written to a temporary name, then renamed.
    """
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx: array dtype {array.dtype} is not uint8")
    header = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
                gz.write(payload)
        else:
            raw.write(payload)
    tmp.replace(path)
