"""Digest of a checkpoint directory, compared across ranks before anything is loaded.

:func:`checkpoint_digest` hashes (SHA-256) ``config.json``, ``model.safetensors.index.json``
when present, and for every ``*.safetensors`` file its name, size, JSON header (tensor
names, dtypes, shapes, offsets) and 16 samples of 4 KiB spread evenly over its data: two
checkpoints of one preset written with different seeds have identical headers, and the
samples tell them apart while reading ~64 KiB per file (a full hash of a 284 GB checkpoint
would take minutes per rank). :func:`check_same` all-gathers the digests and refuses a
mismatch naming the ranks.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

__all__ = ["checkpoint_digest", "settings_digest", "check_same"]

SAMPLES, SAMPLE_BYTES = 16, 4096


def checkpoint_digest(path: str | os.PathLike) -> bytes:
    """32-byte SHA-256 over the checkpoint's config, index, safetensors headers and data
    samples (see the module docstring). Raises FileNotFoundError for a missing directory
    or ``config.json``."""
    root = Path(path)
    h = hashlib.sha256()
    cfg = root / "config.json"
    h.update(b"config.json\0" + cfg.read_bytes())
    idx = root / "model.safetensors.index.json"
    if idx.is_file():
        h.update(b"index\0" + idx.read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f.name.encode() + b"\0" + struct.pack("<Q", size))
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                h.update(b"short")
                continue
            (n,) = struct.unpack("<Q", raw)
            n = min(n, max(size - 8, 0))
            h.update(fh.read(n))
            start, data = 8 + n, max(size - 8 - n, 0)
            for i in range(SAMPLES if data else 0):
                fh.seek(start + (data - min(SAMPLE_BYTES, data)) * i // max(SAMPLES - 1, 1))
                h.update(fh.read(SAMPLE_BYTES))
    return h.digest()


def settings_digest(settings: dict) -> bytes:
    """32-byte SHA-256 of ``repr`` of the sorted run settings (dtype, quant, backend, ids...)."""
    return hashlib.sha256(repr(sorted(settings.items())).encode()).digest()


def check_same(group, digest: bytes, what: str) -> None:
    """All-gather ``digest`` over ``group`` (:class:`.group.RankGroup`) and raise
    :class:`.group.RankFailure` naming every rank whose digest differs from rank 0's."""
    from .group import RankFailure

    got = group.all_gather_bytes(digest, f"the {what} check")
    bad = [r for r, d in enumerate(got) if d != got[0]]
    if bad:
        ranks = ", ".join(str(r) for r in bad)
        raise RankFailure(f"rank {group.rank}: rank{'s' if len(bad) > 1 else ''} {ranks} {'have' if len(bad) > 1 else 'has'} "
                          f"a different {what} than rank 0 (digest {got[bad[0]].hex()[:12]} vs "
                          f"{got[0].hex()[:12]}): every rank must run the same {what}; refused before loading")
