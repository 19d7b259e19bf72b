"""Streaming safetensors writer: tensors in one at a time, shards out, memory ~ one tensor.

:class:`ShardWriter` takes ``(name, tensor)`` pairs in order and packs them greedily into
shards of at most ``max_shard_size`` data bytes (a larger tensor gets a shard of its own).
Each tensor's bytes go straight to the current shard's data file and the tensor is dropped;
when a shard is full its safetensors header (metadata ``{"format": "pt"}``, JSON padded to 8
bytes, exactly what :func:`safetensors.torch.save_file` writes) is written and the data
appended behind it with ``os.copy_file_range`` (in-kernel; no user-space buffer). So the
process holds one tensor at a time whatever the checkpoint size; the disk briefly holds one
shard twice.

:meth:`ShardWriter.finish` names the files as transformers does: one ``model.safetensors``
when everything fits in one shard, else ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name:
file}}``). The writer works inside a staging folder (:mod:`.output_dir`), so half-written
files are never visible at the output path.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from .output_dir import atomic_write_text
from .safetensors_io import INDEX_FILE_NAME, SINGLE_FILE_NAME, shard_file_name

__all__ = ["ShardWriter", "DEFAULT_MAX_SHARD_SIZE", "parse_size", "ST_DTYPES"]

#: transformers 4.x's ``save_pretrained`` default and the Hugging Face Hub's recommended file
#: size (transformers 5 raised its default to 50 GB).
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

#: torch dtype -> safetensors dtype string.
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """Bytes of a size such as ``"5GB"`` (10^9), ``"500MB"``, ``"2GiB"`` (2^30) or ``"1048576"``,
    as transformers' ``max_shard_size`` reads it. Raises ValueError naming ``flag`` for
    anything else or a size < 1 byte."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ValueError(f"{flag} must be a size like 5GB, 500MB, 2GiB or a number of bytes, got {text!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n < 1:
        raise ValueError(f"{flag} must be at least 1 byte, got {text!r}")
    return n


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """safetensors header bytes: 8-byte little-endian length + JSON padded with spaces to 8."""
    hdr: dict[str, object] = {"__metadata__": metadata}
    off = 0
    for name, dt, shape, n in entries:
        hdr[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(hdr, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def _copy_into(dst, src_path: Path) -> None:
    """Append the whole file ``src_path`` to the open binary file ``dst``."""
    dst.flush()
    with open(src_path, "rb") as src:
        left = os.fstat(src.fileno()).st_size
        try:
            while left > 0:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30))
                if n == 0:
                    raise OSError("copy_file_range copied nothing")
                left -= n
        except (AttributeError, OSError):  # no copy_file_range here (or across filesystems)
            src.seek(os.fstat(src.fileno()).st_size - left)
            dst.seek(0, os.SEEK_END)
            while chunk := src.read(64 << 20):
                dst.write(chunk)


class ShardWriter:
    """Write ``(name, tensor)`` pairs into safetensors shards inside folder ``directory``.

    Args:
        directory: an existing folder (normally a staging folder of :mod:`.output_dir`).
        max_shard_size: data bytes per shard; None for a single file whatever the size.
        metadata: the safetensors ``__metadata__`` of every file.

    Use :meth:`add` for each tensor, then :meth:`finish` once. Tensors of any dtype in
    :data:`ST_DTYPES` and any shape (0-d and empty included) are written contiguous, in
    the order given. Raises ValueError for a repeated name, an unsupported dtype or a
    non-positive ``max_shard_size``.
    """

    def __init__(self, directory: str | os.PathLike, max_shard_size: int | None = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None) -> None:
        if max_shard_size is not None and max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
        self.dir = Path(directory)
        self.max = max_shard_size
        self.metadata = dict(metadata or {"format": "pt"})
        self.total = 0
        self._shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = []
        self._names: set[str] = set()
        self._size = 0
        self._data = None  # open data file of the current shard

    def _part(self, i: int, kind: str) -> Path:
        return self.dir / f".shard-{i:05d}.{kind}"

    def _close_shard(self) -> None:
        if self._data is None:
            return
        self._data.close()
        self._data = None
        i = len(self._shards) - 1
        data = self._part(i, "data")
        with open(self._part(i, "safetensors"), "wb") as fh:
            fh.write(_header(self._shards[-1], self.metadata))
            _copy_into(fh, data)
        data.unlink()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name`` (starting a new shard first when it would not fit)."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in ST_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors here "
                             f"(supported: {', '.join(str(d) for d in ST_DTYPES)})")
        t = tensor.detach().contiguous()
        n = t.numel() * t.element_size()
        if self._data is not None and self.max is not None and self._size + n > self.max:
            self._close_shard()
        if self._data is None:
            self._shards.append([])
            self._size = 0
            self._data = open(self._part(len(self._shards) - 1, "data"), "wb")
        if n:
            self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._shards[-1].append((name, t.dtype, tuple(t.shape), n))
        self._names.add(name)
        self._size += n
        self.total += n

    def finish(self) -> list[str]:
        """Close the last shard, give the files their final names (a single
        ``model.safetensors``, or numbered shards plus the index) and return the file names.
        Raises ValueError when no tensor was added."""
        self._close_shard()
        if not self._shards:
            raise ValueError("no tensors to write")
        count = len(self._shards)
        names = [SINGLE_FILE_NAME] if count == 1 else [shard_file_name(i + 1, count) for i in range(count)]
        for i, fname in enumerate(names):
            os.replace(self._part(i, "safetensors"), self.dir / fname)
        if count > 1:
            wmap = {e[0]: fname for fname, shard in zip(names, self._shards) for e in shard}
            atomic_write_text(self.dir / INDEX_FILE_NAME,
                              json.dumps({"metadata": {"total_size": self.total}, "weight_map": wmap}, indent=2))
            names.append(INDEX_FILE_NAME)
        return names

    def abort(self) -> None:
        """Close the open data file (the staging folder is deleted by its owner)."""
        if self._data is not None:
            self._data.close()
            self._data = None

