"""Reading a float or release checkpoint one tensor at a time (the source side of ``quantize``).

:func:`~.safetensors_io.load_checkpoint` returns the whole model; a converter that writes
shard by shard needs the tensors one by one. :class:`StreamingSource` checks the headers first
(the same rules as the loader: every expected tensor present once, no extras, shapes, float /
integer dtype kinds, index and shards consistent) and then yields ``(canonical name,
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
from safetensors import SafetensorError, safe_open

from .. import models
from ..errors import CheckpointError
from ..models import load_config
from .names import canonical_name, expected_tensors, is_ignored
from .release import (
    RELEASE,
    decode_release_weight,
    expected_release_tensors,
    is_release_kind,
    read_config,
    release_dtype_problem,
    release_format_of,
)
from .safetensors_io import INDEX_FILE_NAME, SINGLE_FILE_NAME, checkpoint_quant

__all__ = ["StreamingSource"]

_FLOAT = {"F16": 2, "BF16": 2, "F32": 4}
_INT = {"I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1}
_ITEMSIZE = {**_FLOAT, **_INT, "F8_E4M3": 1, "F8_E8M0": 1}
_FINITE_CHUNK = 1 << 24


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
        index = root / INDEX_FILE_NAME
        if index.exists():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
                files = sorted(set(wmap.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid index ({e!r}); expected "
                                      "{\"weight_map\": {tensor name: shard file}}") from e
        elif (root / SINGLE_FILE_NAME).is_file():
            wmap, files = None, [SINGLE_FILE_NAME]
        else:
            raise CheckpointError(f"no {SINGLE_FILE_NAME} or {INDEX_FILE_NAME} in {root}")
        self._where: dict[str, tuple[Path, str, str, tuple[int, ...]]] = {}
        for fname in files:
            file = root / fname
            if Path(fname).name != fname or not file.is_file():
                raise CheckpointError(f"shard {fname!r} listed in {INDEX_FILE_NAME} is missing from {root}")
            try:
                with safe_open(str(file), framework="pt") as f:
                    heads = {k: (f.get_slice(k).get_dtype(), tuple(int(s) for s in f.get_slice(k).get_shape()))
                             for k in f.keys()}
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"cannot read safetensors file {file}: {e}") from e
            for k, (st, shape) in heads.items():
                if is_ignored(k, cfg) or (wmap is not None and k in wmap and wmap[k] != fname):
                    continue
                if wmap is not None and k not in wmap:
                    raise CheckpointError(f"tensor {k!r} found in {fname} but it is not listed in {INDEX_FILE_NAME}")
                canon = canonical_name(k, cfg)
                if canon in self._where:
                    prev = self._where[canon]
                    raise CheckpointError(f"duplicate tensor {canon!r}: stored as {prev[1]!r} in {prev[0].name} "
                                          f"and as {k!r} in {fname}")
                self._where[canon] = (file, k, st, shape)
        if wmap is not None:
            absent = [k for k in wmap if not is_ignored(k, cfg) and canonical_name(k, cfg) not in self._where]
            if absent:
                raise CheckpointError(f"tensor {absent[0]!r} is listed in {INDEX_FILE_NAME} under "
                                      f"{wmap[absent[0]]!r} but that file does not contain it")
        stored_quant = checkpoint_quant(root)
        if stored_quant not in (None, RELEASE):
            raise CheckpointError(f"{root} is a quantized ({stored_quant}) checkpoint; expected a float or release one")
        self.release = release_format_of(read_config(root), root) if stored_quant == RELEASE else None
        self.expected = expected = expected_tensors(cfg)
        stored = (expected if self.release is None else
                  expected_release_tensors(cfg, self.release, {n: w[2:] for n, w in self._where.items()}))
        self._stored = stored
        missing = [n for n in stored if n not in self._where]
        extra = [n for n in self._where if n not in stored]
        if missing or extra:
            raise CheckpointError(f"checkpoint {root} does not match {cfg.summary()}: "
                                  f"{len(missing)} missing tensors {missing[:10]}, {len(extra)} unexpected "
                                  f"{extra[:10]}")
        problems = []
        for name, info in stored.items():
            file, _, st, shape = self._where[name]
            if shape != info.shape:
                problems.append(f"tensor {name!r} in {file.name}: expected shape {list(info.shape)}, got {list(shape)}")
            if is_release_kind(info.kind):
                problem = release_dtype_problem(info.kind, st)
                if problem:
                    problems.append(f"tensor {name!r} in {file.name}: {problem}")
                continue
            ok = _INT if info.kind == "int" else _FLOAT
            if st not in ok:
                problems.append(f"tensor {name!r} in {file.name}: expected dtype {'/'.join(ok)}, got {st}")
        if problems:
            raise CheckpointError(f"checkpoint {root}: {len(problems)} tensor(s) fail validation:\n  "
                                  + "\n  ".join(problems[:20]))
        self.nbytes = sum(math.prod(s) * _ITEMSIZE.get(st, 1) for _, _, st, s in self._where.values())

    def is_dequantized(self, name: str) -> bool:
        """True when canonical ``name`` is stored in a release format (FP8 / MXFP4) and is
        yielded dequantised (float32)."""
        return is_release_kind(self._stored[name].kind)

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype string (``"BF16"``, ...) canonical ``name`` is stored in."""
        return self._where[name][2]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(canonical name, tensor)`` in :func:`expected_tensors` order: as stored for a
        float checkpoint; a release weight dequantised to float32 (exact for UE8M0 scales and
        MXFP4). Each tensor is checked (finite floats, valid index tables, valid release
        scales) before it is yielded and is a private copy (not a view of a file mapping)."""
        spec = models.spec_for_config(self.cfg)
        reader = _Reader()
        try:
            for name, info in self.expected.items():
                file = self._where[name][0]
                t = reader.read(name, *self._where[name][:2])
                kind = self._stored[name].kind
                if is_release_kind(kind):
                    sname = spec.release_scale_name(name)
                    scale = reader.read(sname, *self._where[sname][:2])
                    try:
                        t = decode_release_weight(name, kind, t, scale, self.release, self.cfg, "none",
                                                  torch.float32, None)
                    finally:
                        del scale
                elif info.kind == "int":
                    problem = spec.check_int_tensor(name, t, self.cfg)
                    if problem:
                        raise CheckpointError(f"tensor {name!r} in {file.name}: {problem}")
                else:
                    _check_finite(name, file, t)
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


def _check_finite(name: str, file: Path, t: torch.Tensor) -> None:
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            bad = int((~torch.isfinite(flat)).sum())
            raise CheckpointError(f"tensor {name!r} in {file.name}: expected finite values, found {bad} "
                                  f"NaN/Inf of {t.numel()}")
