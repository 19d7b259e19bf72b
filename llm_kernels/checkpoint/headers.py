"""The header side of a checkpoint folder: which files, which tensors, their dtypes and shapes,
validated against what the model (and the folder's format) expects, before any tensor data
is read. Shared by :func:`~.safetensors_io.load_checkpoint` (the whole model at once) and
:class:`~.source.StreamingSource` (tensor by tensor, for the writers), so both refuse the
same folders with the same messages (``docs/checkpoints.md``, "What load_checkpoint
validates", steps 1-6).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from .. import models
from ..errors import CheckpointError
from ..kernels.common.weight_quant import count_nonfinite
from .names import QUANT_METHODS, canonical_name, expected_tensors, is_ignored
from .release import (
    RELEASE,
    RELEASE_QUANT_METHOD,
    ReleaseFormat,
    expected_release_tensors,
    is_release_kind,
    release_dtype_problem,
)
from .tensor_info import TensorInfo

__all__ = ["SINGLE_FILE_NAME", "INDEX_FILE_NAME", "SHARD_RE", "CheckpointHeaders", "StoredTensor", "read_headers",
           "checkpoint_quant", "tensor_label", "diagnose_file", "st_itemsize", "check_tensor_finite", "listing"]

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# safetensors dtype strings -> (torch dtype, kind)
_ST_DTYPES: dict[str, tuple[torch.dtype | None, str]] = {
    "F16": (torch.float16, "float"),
    "BF16": (torch.bfloat16, "float"),
    "F32": (torch.float32, "float"),
    "F64": (torch.float64, "float64"),
    "I8": (torch.int8, "int"),
    "I16": (torch.int16, "int"),
    "I32": (torch.int32, "int"),
    "I64": (torch.int64, "int"),
    "U8": (torch.uint8, "int"),
    "U16": (None, "int"),
    "U32": (None, "int"),
    "U64": (None, "int"),
    "BOOL": (torch.bool, "bool"),
}
_FLOAT_OK = ("F16", "BF16", "F32")
_FINITE_CHUNK = 1 << 24  # elements per NaN/Inf check chunk
_MAX_LISTED = 20
_ST_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
                "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def st_itemsize(st_dtype: str) -> int:
    """Bytes per element of a safetensors dtype string."""
    return _ST_ITEMSIZE.get(st_dtype, 1)


def listing(names: Iterable[str], limit: int = _MAX_LISTED) -> str:
    """Up to ``limit`` names joined, then a count of the rest."""
    names = list(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


@dataclass(frozen=True)
class StoredTensor:
    """Where one canonical tensor lives and how it is stored: ``file``, the name ``stored``
    in that file, the safetensors ``dtype`` string and the ``shape``."""

    file: Path
    stored: str
    dtype: str
    shape: tuple[int, ...]


def tensor_label(canon: str, src: StoredTensor | None = None) -> str:
    """``'layers.0.attn.wq_a.weight'`` or ``'layers.0.attn.wq_a.weight' (stored as 'model.…' in x.safetensors)``."""
    if src is None:
        return repr(canon)
    stored = f"stored as {src.stored!r} in " if src.stored != canon else "in "
    return f"{canon!r} ({stored}{src.file.name})"


# ====================================================================== discovery
def stored_names(root: Path) -> list[str]:
    """Every tensor name stored in checkpoint folder ``root`` (the index's weight_map, or the
    single file's header). Raises CheckpointError as :func:`read_headers` for a bad layout."""
    files, wmap = _weight_files(root)
    if wmap is not None:
        return list(wmap)
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {files[0]}: {e}") from e


def config_as_stored(root: Path, cfg):
    """``cfg`` with ``num_nextn_predict_layers = 0`` when the folder holds none of the
    multi-token-prediction blocks the config announces (transformers' ``save_pretrained``
    writes the release's config but drops ``mtp.*``), else ``cfg``: the model the files hold."""
    n = getattr(cfg, "num_nextn_predict_layers", 0)
    if not n:
        return cfg
    base = cfg.replace(num_nextn_predict_layers=0)
    spec = models.spec_for_config(cfg)
    only_mtp = set(spec.expected_float_tensors(cfg)) - set(spec.expected_float_tensors(base))
    have = {canonical_name(k, cfg) for k in stored_names(root)}
    return cfg if only_mtp & have else base


def _weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read and, for a sharded checkpoint, the index's weight_map
    (stored name -> file name). Raises CheckpointError for pickle-only / empty / broken layouts."""
    index_path = root / INDEX_FILE_NAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path} is not valid JSON: {e}") from e
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{index_path} has no 'weight_map' (expected "
                                  "{\"weight_map\": {tensor name: shard file}})")
        by_file: dict[str, list[str]] = {}
        for name, fname in wmap.items():
            if not isinstance(fname, str) or Path(fname).name != fname or fname in (".", ".."):
                raise CheckpointError(f"{index_path}: tensor {name!r} maps to {fname!r}; expected a "
                                      "file name in the checkpoint directory")
            by_file.setdefault(fname, []).append(name)
        missing = [f for f in sorted(by_file) if not (root / f).is_file()]
        if missing:
            f = missing[0]
            raise CheckpointError(
                f"shard {f!r} listed in {INDEX_FILE_NAME} is missing from {root} "
                f"(it holds {len(by_file[f])} tensors, e.g. {listing(by_file[f], 3)}); "
                f"missing shards: {listing(missing)}")
        return [root / f for f in sorted(by_file)], dict(wmap)
    single = root / SINGLE_FILE_NAME
    if single.is_file():
        return [single], None
    st_files = sorted(p.name for p in root.glob("*.safetensors"))
    if st_files:
        raise CheckpointError(f"{root} has safetensors files ({listing(st_files, 5)}) but neither "
                              f"{SINGLE_FILE_NAME} nor {INDEX_FILE_NAME}")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{root} holds only pickle checkpoint files ({listing(pickles, 5)}); "
                              "pickle checkpoints are refused (they can execute code). Convert them to "
                              "safetensors first.")
    raise CheckpointError(f"no {SINGLE_FILE_NAME} or {INDEX_FILE_NAME} in {root}")


def diagnose_file(file: Path, cfg) -> str:
    """Best-effort explanation of an unreadable safetensors file: header problems, or the
    tensors whose data lies past the end of a truncated file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f" (file is {size} bytes: truncated inside the 8-byte header length)"
            (hlen,) = struct.unpack("<Q", raw)
            if 8 + hlen > size:
                return (f" (header declares {hlen} bytes but the file has {size}: truncated or "
                        "not a safetensors file)")
            header = json.loads(fh.read(hlen))
    except (OSError, ValueError, UnicodeDecodeError):
        return " (corrupt header)"
    if not isinstance(header, dict):
        return " (corrupt header)"
    avail = size - 8 - hlen
    need = 0
    cut: list[str] = []
    for k, v in header.items():
        if k == "__metadata__" or not isinstance(v, dict):
            continue
        try:
            end = int(v["data_offsets"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            return f" (corrupt header entry for tensor {k!r})"
        need = max(need, end)
        if end > avail:
            c = canonical_name(k, cfg)
            cut.append(repr(k) if c == k else f"{c!r} (stored as {k!r})")
    if cut:
        return (f" (file truncated: data section is {avail} bytes, header needs {need}; tensors cut "
                f"off: {listing(cut)})")
    return " (truncated or corrupt?)"


def checkpoint_quant(path: str | os.PathLike) -> str | None:
    """The quantisation scheme ``config.json`` declares: ``"w8a8"`` / ``"int8"`` /
    ``"int8_g32"`` for this project's formats (``quantization_config.quant_method``
    ``"llm_kernels_w8a8"`` / ...), ``"release"`` for an official FP8 (+ MXFP4) release
    (``quant_method: "fp8"``, :mod:`.release`), None for a float checkpoint. Raises
    CheckpointError for another quantization method."""
    p = Path(path) / "config.json"
    try:
        qc = json.loads(p.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return None  # from_json reports the problem
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == RELEASE_QUANT_METHOD:
        return RELEASE
    for scheme, m in QUANT_METHODS.items():
        if method == m:
            return scheme
    raise CheckpointError(f"{p}: quantization_config.quant_method {method!r} is not supported (only "
                          f"{', '.join(repr(m) for m in (*QUANT_METHODS.values(), RELEASE_QUANT_METHOD))})")


@dataclass(frozen=True)
class CheckpointHeaders:
    """A checkpoint folder's validated headers: ``files`` to read, ``where`` (canonical name
    -> :class:`StoredTensor`) and ``expected`` (canonical name -> TensorInfo, in the model's
    order; for a release with each block scale after its weight), ``release`` (the
    :class:`~.release.ReleaseFormat` of a release checkpoint, else None)."""

    files: list[Path]
    where: dict[str, StoredTensor]
    expected: dict[str, TensorInfo]
    release: ReleaseFormat | None


def read_headers(root: Path, cfg, stored_quant: str | None, release: ReleaseFormat | None) -> CheckpointHeaders:
    """Read and check the headers of checkpoint folder ``root`` of ``cfg``'s model stored as
    ``stored_quant`` (:func:`checkpoint_quant`; ``release``: its format). Reads no tensor data.

    Raises CheckpointError: pickle-only folder; missing index shard; unreadable safetensors
    file; a tensor in a shard but not in the index (or the reverse); two stored names for one
    canonical name; missing tensors (up to 20 listed plus a count); extra tensors; a wrong
    shape; a float tensor not F16/BF16/F32; an index table not an integer type; an INT8
    weight not I8; a release weight or block scale of the wrong dtype or shape."""
    files, wmap = _weight_files(root)
    expected = expected_tensors(cfg, stored_quant) if release is None else None
    # ---- 1. Read headers: names, shapes, dtypes (no tensor data yet).
    sources: dict[str, StoredTensor] = {}
    meta: dict[str, tuple[str, tuple[int, ...]]] = {}
    problems: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                headers = {}
                for k in keys:
                    sl = f.get_slice(k)
                    headers[k] = (sl.get_dtype(), tuple(int(s) for s in sl.get_shape()))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {file}: {e}{diagnose_file(file, cfg)}") from e
        for k in keys:
            if is_ignored(k, cfg):
                continue
            if wmap is not None and wmap.get(k) != file.name:
                if k in wmap:
                    continue  # a copy in another shard; the index decides where it is read from
                raise CheckpointError(f"tensor {k!r} ({canonical_name(k, cfg)!r}) found in {file.name} but "
                                      f"it is not listed in {INDEX_FILE_NAME}")
            canon = canonical_name(k, cfg)
            if canon in sources:
                prev = sources[canon]
                raise CheckpointError(
                    f"duplicate tensor {canon!r}: stored as {prev.stored!r} in {prev.file.name} and as "
                    f"{k!r} in {file.name}")
            sources[canon] = StoredTensor(file, k, *headers[k])
            meta[canon] = headers[k]
    if wmap is not None:
        absent = [k for k, fname in wmap.items()
                  if not is_ignored(k, cfg) and canonical_name(k, cfg) not in sources]
        if absent:
            k = absent[0]
            raise CheckpointError(f"tensor {k!r} is listed in {INDEX_FILE_NAME} under {wmap[k]!r} but "
                                  f"that file does not contain it ({len(absent)} such tensors: "
                                  f"{listing(absent)})")

    if release is not None:
        expected = expected_release_tensors(cfg, release, meta)

    # ---- 2. Presence / extras.
    missing = [n for n in expected if n not in sources]
    if missing:
        raise CheckpointError(f"checkpoint {root} is missing {len(missing)} of {len(expected)} expected "
                              f"tensors for {cfg.summary()}: {listing(missing)}")
    extra = [n for n in sources if n not in expected]
    if extra:
        labels = [tensor_label(n, sources[n]) for n in extra]
        raise CheckpointError(f"checkpoint {root} has {len(extra)} unexpected tensors (not used by "
                              f"{cfg.summary()}): {listing(labels)}")

    # ---- 3. Shapes and dtype kinds (from headers).
    for name, info in expected.items():
        st_dtype, shape = meta[name]
        lab = tensor_label(name, sources[name])
        if shape != info.shape:
            problems.append(f"tensor {lab}: expected shape {list(info.shape)}, got {list(shape)}")
        kind = _ST_DTYPES.get(st_dtype, (None, "unknown"))[1]
        if shape != info.shape and info.kind == "fp8_scale":
            problems[-1] += (f" (one scale per {release.block[0]}x{release.block[1]} block of its weight: "
                             "quantization_config.weight_block_size)")
        if is_release_kind(info.kind):
            problem = release_dtype_problem(info.kind, st_dtype)
            if problem:
                problems.append(f"tensor {lab}: {problem}")
        elif info.kind == "int8":
            if st_dtype != "I8":
                problems.append(f"tensor {lab}: expected dtype I8 (W8A8 weight), got {st_dtype}")
        elif info.kind == "int":
            if kind != "int":
                problems.append(f"tensor {lab}: expected an integer dtype, got {st_dtype}")
            elif _ST_DTYPES[st_dtype][0] is None:
                problems.append(f"tensor {lab}: integer dtype {st_dtype} is not supported by torch "
                                "here; expected I32 or I64")
        elif st_dtype not in _FLOAT_OK:
            hint = (" (FP8 tensors are read only in a release checkpoint, quantization_config.quant_method "
                    "'fp8')" if st_dtype.startswith("F8") else "")
            problems.append(f"tensor {lab}: expected dtype F16, BF16 or F32, got {st_dtype}{hint}")
    if problems:
        raise CheckpointError(f"checkpoint {root}: {len(problems)} tensor(s) fail validation:\n  "
                              + "\n  ".join(problems[:_MAX_LISTED])
                              + (f"\n  ... ({len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""))

    return CheckpointHeaders(files, sources, expected, release)


def check_tensor_finite(name: str, src: StoredTensor, t: torch.Tensor) -> None:
    """Raise CheckpointError if ``t`` holds NaN/Inf. A float16/bfloat16/float32 tensor is
    counted in one parallel pass over its bits (:func:`count_nonfinite`); the error's counts
    and first index come from torch, in chunks of 16M elements."""
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32) and count_nonfinite(t) == 0:
        return
    flat = t.reshape(-1)
    n_nan = n_inf = 0
    first = -1
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        if bool(torch.isfinite(chunk).all()):
            continue
        nan = torch.isnan(chunk)
        n_nan += int(nan.sum())
        n_inf += int(torch.isinf(chunk).sum())
        if first < 0:
            first = start + int((~torch.isfinite(chunk)).nonzero()[0, 0])
    if n_nan or n_inf:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(t.shape))) if t.dim() else ()
        raise CheckpointError(f"tensor {tensor_label(name, src)}: expected finite values, found {n_nan} NaN and "
                              f"{n_inf} Inf of {t.numel()} (first at index {list(idx)})")


