"""SHA-256 manifests in ``sha256sum`` format (``<hex>  <name>`` per line), written and verified.

The data that ships with the project carries one (``SHA256SUMS``), so a file damaged in a copy, a
checkout or a download is refused at load time with a short message instead of training on noise;
``sha256sum -c SHA256SUMS`` in that folder checks the same thing without Python.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "SHA256SUMS"


class ChecksumError(ValueError):
    """A file does not match its recorded SHA-256, or the manifest itself is missing or malformed."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, str]:
    """``{file name: hex digest}`` from ``folder/SHA256SUMS``."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ChecksumError(f"{path} is missing: cannot verify the files of {folder}")
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or "/" in name:
            raise ChecksumError(f"{path}:{number}: not a '<sha256>  <name>' line: {line!r}")
        entries[name.lstrip("*")] = digest.lower()
    return entries


def verify_manifest(folder: Path, hint: str = "") -> None:
    """Raise :class:`ChecksumError` naming the first file of the manifest that is missing or differs."""
    for name, expected in read_manifest(folder).items():
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"{path} is missing (listed in {MANIFEST}). {hint}".rstrip())
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(f"{path} is corrupt: SHA-256 {actual[:12]}..., expected {expected[:12]}... "
                                f"{hint}".rstrip())


def write_manifest(folder: Path, names: list[str]) -> Path:
    """Write ``folder/SHA256SUMS`` for ``names`` (sorted), atomically; return its path."""
    lines = [f"{sha256_file(folder / name)}  {name}" for name in sorted(names)]
    path = folder / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
