"""Reading a float or release checkpoint one tensor at a time (the source side of ``quantize``).

:func:`~.safetensors_io.load_checkpoint` returns the whole model; a converter that writes
shard by shard needs the tensors one by one. :class:`StreamingSource` checks the headers first
(:func:`~.headers.read_headers`, the loader's own checks: every expected tensor present once,
no extras, shapes, float / integer dtype kinds, index and shards consistent) and then yields ``(canonical name,
tensor)`` in :func:`~.names.expected_tensors` order, each checked for NaN/Inf (float) or by
the model's ``check_int_tensor`` (index tables) right after it is read, as stored (no dtype
cast). A failure raises :class:`CheckpointError` naming the tensor and the file. Each tensor is read
with plain file reads into a fresh tensor (no memory mapping), so the process holds only the
tensors alive: the file pages read before stay in the page cache, not in its resident set.

A release checkpoint (FP8 + MXFP4, :mod:`.release`) is read dequantised: each FP8 / MXFP4
weight is read with its scale and decoded by :func:`~.release.decode_release_weight` (the
loader's ``quant="none"`` path), so the iteration yields the same canonical float tensors as
for a float checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

from .. import models
from ..errors import CheckpointError
from ..models import load_config
from .headers import (
    check_tensor_finite,
    checkpoint_quant,
    config_as_stored,
    read_headers,
    st_itemsize,
    tensor_label,
)
from .names import expected_tensors
from .release import (
    RELEASE,
    decode_release_weight,
    is_release_kind,
    read_config,
    release_format_of,
)

__all__ = ["StreamingSource"]



class StreamingSource:
    """A float or release checkpoint folder, validated by its headers and read tensor by tensor.

    Attributes: ``root`` (Path), ``cfg`` (the parsed config), ``nbytes`` (stored tensor
    bytes, ``int``), ``release`` (the :class:`~.release.ReleaseFormat` of a release
    checkpoint, else None).

    Raises (in the constructor, before any tensor data is read):
        ConfigError: ``config.json`` missing or invalid.
        CheckpointError: no ``model.safetensors`` / index, a missing or unreadable shard, a
            tensor in a shard but not in the index (or the reverse), two stored names for one
            canonical name, missing / extra tensors, a wrong shape, a float tensor not
            F16/BF16/F32, an index table not an integer type, a release weight or scale of
            the wrong dtype; a checkpoint of this project's INT8 formats.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.root = root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint path {root} is not a directory")
        self.cfg = cfg = load_config(root)
        stored_quant = checkpoint_quant(root)
        if stored_quant not in (None, RELEASE):
            raise CheckpointError(f"{root} is a quantized ({stored_quant}) checkpoint; expected a float or release one")
        self.release = release_format_of(read_config(root), root) if stored_quant == RELEASE else None
        self.cfg = cfg = config_as_stored(root, cfg)  # an MTP block is carried along when the files hold it
        headers = read_headers(root, cfg, stored_quant, self.release)  # the loader's checks, steps 1-6
        self._where = headers.where
        self._stored = headers.expected
        self.expected = expected_tensors(cfg)
        self.nbytes = sum(math.prod(w.shape) * st_itemsize(w.dtype) for w in self._where.values())

    def is_dequantized(self, name: str) -> bool:
        """True when canonical ``name`` is stored in a release format (FP8 / MXFP4) and is
        yielded dequantised (float32)."""
        return is_release_kind(self._stored[name].kind)

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype string (``"BF16"``, ...) canonical ``name`` is stored in."""
        return self._where[name].dtype

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(canonical name, tensor)`` in :func:`expected_tensors` order: as stored for a
        float checkpoint; a release weight dequantised to float32 (exact for UE8M0 scales and
        MXFP4). Each tensor is checked (finite floats, valid index tables, valid release
        scales) before it is yielded and is a private copy (not a view of a file mapping)."""
        spec = models.spec_for_config(self.cfg)
        reader = _Reader()
        try:
            for name, info in self.expected.items():
                where = self._where[name]
                t = reader.read(name, where.file, where.stored)
                kind = self._stored[name].kind
                if is_release_kind(kind):
                    sname = spec.release_scale_name(name)
                    scale = reader.read(sname, self._where[sname].file, self._where[sname].stored)
                    try:
                        t = decode_release_weight(name, kind, t, scale, self.release, self.cfg, "none",
                                                  torch.float32, None)
                    finally:
                        del scale
                elif info.kind == "int":
                    problem = spec.check_int_tensor(name, t, self.cfg)
                    if problem:
                        raise CheckpointError(f"tensor {tensor_label(name, where)}: {problem}")
                else:
                    check_tensor_finite(name, where, t)
                yield name, t
                del t
        finally:
            reader.close()


class _Reader:
    """Reads one tensor's bytes straight from its file into a fresh tensor (``pread`` at the
    offsets of the file's header, parsed once per file): no file mapping, so only the tensors
    alive count in the resident set, never the file pages read before."""

    _ST_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                 "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                 "F8_E8M0": torch.float8_e8m0fnu}

    def __init__(self) -> None:
        self.headers: dict[Path, tuple[dict, int]] = {}

    def _header(self, file: Path) -> tuple[dict, int]:
        if file not in self.headers:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self.headers[file] = (json.loads(fh.read(n)), 8 + n)
        return self.headers[file]

    def read(self, name: str, file: Path, stored: str) -> torch.Tensor:
        try:
            header, start = self._header(file)
            entry = header[stored]
            dtype = self._ST_TORCH[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            buf = torch.empty(end - begin, dtype=torch.uint8)
            with open(file, "rb", buffering=0) as fh:
                fh.seek(start + begin)
                view, got = memoryview(buf.numpy()), 0
                while got < end - begin:
                    n = fh.readinto(view[got:])
                    if not n:
                        raise OSError(f"file ends after {start + begin + got} bytes; the tensor needs "
                                      f"{start + end}")
                    got += n
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {e} (truncated or corrupt file?)") from e
        return buf.view(dtype).reshape(entry["shape"])

    def close(self) -> None:
        self.headers.clear()
