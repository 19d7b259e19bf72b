"""Reading checkpoints of any registered model (Hugging Face directory layout, safetensors only).

A checkpoint directory holds ``config.json`` plus either ``model.safetensors`` or sharded
``model-0000i-of-0000N.safetensors`` files with ``model.safetensors.index.json``. The model's
spec (``models/<name>/weights.py``) names the tensors and maps stored names to canonical ones
(e.g. DeepSeek-V4's ``model.``-prefixed transformers names to its release names). Pickle checkpoints (``*.bin``, ``*.pt``) are refused: they can run code.

:func:`load_checkpoint` validates every tensor against :func:`~.names.expected_tensors` before
returning (presence, extras, shapes, dtype kinds, hash-routing table, NaN/Inf) and raises
:class:`CheckpointError` naming the tensor. The writer of seeded random checkpoints is
:mod:`llm_kernels.checkpoint.writer`.

See ``docs/checkpoints.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .. import models
from ..errors import CheckpointError
from ..models import load_config
from .names import (
    QUANT_METHODS,
    canonical_name,
    expected_tensors,
    is_fp32_tensor,
    is_ignored,
)
from .quantized import assemble_w8a8, quantize_for
from .release import (
    RELEASE,
    RELEASE_QUANT_METHOD,
    decode_release_weight,
    expected_release_tensors,
    is_release_kind,
    is_release_scale,
    read_config,
    release_dtype_problem,
    release_format_of,
)

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "DEFAULT_MAX_BYTES",
    "SINGLE_FILE_NAME",
    "INDEX_FILE_NAME",
    "shard_file_name",
    "is_fp32_tensor",
    "SHARD_RE",
    "TORCH_TO_ST",
    "DTYPE_NAMES",
    "check_dtype_arg",
    "fmt_bytes",
]

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
DEFAULT_MAX_BYTES = 8 * 2**30
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
TORCH_TO_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_FINITE_CHUNK = 1 << 24  # elements per NaN/Inf check chunk
_MAX_LISTED = 20



# ====================================================================== helpers
def shard_file_name(index: int, count: int) -> str:
    """``model-0000{index}-of-0000{count}.safetensors`` (1-based ``index``)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _listing(names: Iterable[str], limit: int = _MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


class _Source:
    """Where one canonical tensor lives: file path and the name stored in that file."""

    __slots__ = ("file", "stored")

    def __init__(self, file: Path, stored: str) -> None:
        self.file = file
        self.stored = stored


def _label(canon: str, src: _Source | None = None) -> str:
    """``'layers.0.attn.wq_a.weight'`` or ``'layers.0.attn.wq_a.weight' (stored as 'model.…' in x.safetensors)``."""
    if src is None:
        return repr(canon)
    stored = f"stored as {src.stored!r} in " if src.stored != canon else "in "
    return f"{canon!r} ({stored}{src.file.name})"


# ====================================================================== discovery
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
                f"(it holds {len(by_file[f])} tensors, e.g. {_listing(by_file[f], 3)}); "
                f"missing shards: {_listing(missing)}")
        return [root / f for f in sorted(by_file)], dict(wmap)
    single = root / SINGLE_FILE_NAME
    if single.is_file():
        return [single], None
    st_files = sorted(p.name for p in root.glob("*.safetensors"))
    if st_files:
        raise CheckpointError(f"{root} has safetensors files ({_listing(st_files, 5)}) but neither "
                              f"{SINGLE_FILE_NAME} nor {INDEX_FILE_NAME}")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{root} holds only pickle checkpoint files ({_listing(pickles, 5)}); "
                              "pickle checkpoints are refused (they can execute code). Convert them to "
                              "safetensors first.")
    raise CheckpointError(f"no {SINGLE_FILE_NAME} or {INDEX_FILE_NAME} in {root}")


def _diagnose(file: Path, cfg) -> str:
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
                f"off: {_listing(cut)})")
    return " (truncated or corrupt?)"


def check_dtype_arg(dtype: torch.dtype | None, allowed: tuple[torch.dtype, ...], what: str) -> None:
    if dtype is not None and dtype not in allowed:
        raise ValueError(f"{what} must be one of {[str(d) for d in allowed]}, got {dtype!r}")


# ====================================================================== loading
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


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
    progress: bool = True,
    quant: str | None = None,
) -> tuple[object, dict[str, torch.Tensor]]:
    """Load and validate a checkpoint directory of any registered model (``config.json``'s
    ``model_type`` picks the spec, see :func:`llm_kernels.models.load_config`).

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or sharded
            ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` (the index's
            ``weight_map`` decides which shard each tensor is read from).
        dtype: ``None`` returns tensors as stored. ``torch.float32`` / ``torch.bfloat16`` cast
            every float tensor to it, except the model's ``is_fp32_tensor`` tensors (DeepSeek-V4:
            hc mixing params, ``attn_sink``, compressor ``ape``, ``gate.bias``, norms), which
            are always returned float32. ``gate.tid2eid`` is returned int64 whenever ``dtype`` is set.
        check_finite: scan every float tensor for NaN/Inf (chunked).
        progress: show a tqdm bar (bytes read); tqdm hides it when stderr is not a terminal.
        quant: ``None``: as stored. ``"w8a8"`` / ``"int8"``: the scheme's INT8 weights
            (:mod:`~.quantized`) are returned as
            :class:`~llm_kernels.numerics.quant.QuantWeight` under their
            ``*.weight`` name (float weights are quantized on load; stored ``*.weight`` int8
            + ``*.weight_scale`` pairs are assembled; ``"int8"`` on a ``w8a8`` checkpoint
            quantizes the rest of its set). ``"none"``: the checkpoint must be float (or a
            release, dequantized). A quantized checkpoint loaded with ``quant=None`` is
            returned as stored. A release checkpoint (FP8 + MXFP4, :mod:`.release`): MXFP4
            weights stay :class:`~llm_kernels.numerics.mxfp4.MXFP4Weight` and FP8 weights are
            converted once to ``quant``'s INT8 format (``None``: ``"int8_g32"``), together
            with the float weights of that scheme's set; ``"none"`` dequantizes everything.

    Returns:
        ``(cfg, tensors)``: the parsed config and ``{canonical name: tensor}`` holding exactly
        the names of :func:`~.names.expected_tensors` (same order), with its shapes: weights
        ``[out, in]``, norms ``[dim]``, ``tid2eid`` ``[vocab_size, num_experts_per_tok]``.
        ``model.``-prefixed transformers names are mapped with :func:`~.names.canonical_name`;
        ``mtp.*`` tensors are skipped.

    Raises:
        ConfigError: ``config.json`` missing or invalid.
        CheckpointError: pickle-only directory; missing index shard; unreadable / truncated
            safetensors file (names the file and, when reading a tensor fails, the tensor);
            two stored names mapping to one canonical name; missing tensors (all listed, up to
            20 names plus a count); unexpected extra tensors; wrong shape; float tensor not
            float16/bfloat16/float32; non-integer ``tid2eid``; ``tid2eid`` entry outside
            ``[0, n_routed_experts)`` or a row with a repeated expert (first bad row named);
            NaN/Inf values (tensor and counts named).
        ValueError: ``dtype`` not None / float32 / bfloat16.
    """
    check_dtype_arg(dtype, (torch.float32, torch.bfloat16), "load_checkpoint dtype")
    if quant not in (None, "none", *QUANT_METHODS):
        raise ValueError(f"quant must be None, 'none' or one of {sorted(QUANT_METHODS)}, got {quant!r}")
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path {root} is not a directory")
    cfg = load_config(root)  # first: an unsupported model_type is the clearest error
    files, wmap = _weight_files(root)
    stored_quant = checkpoint_quant(root)
    release = release_format_of(read_config(root), root) if stored_quant == RELEASE else None
    if release is not None:
        quant = quant or "int8_g32"  # a release's own 2-D weights load into the INT8 kernels
    if quant == "none" and stored_quant not in (None, RELEASE):
        raise CheckpointError(f"checkpoint {root} is {stored_quant.upper()} (INT8 weights); it cannot be loaded as float")
    if quant == "w8a8" and stored_quant == "int8":
        raise CheckpointError(f"checkpoint {root} is int8 (a superset of w8a8 stored INT8); load it with "
                              "quant='int8' or as stored")
    if (stored_quant not in (None, RELEASE) and quant not in (None, "none", stored_quant)
            and "int8_g32" in (quant, stored_quant)):
        raise CheckpointError(f"checkpoint {root} is {stored_quant}; it cannot be loaded as {quant} (the scale "
                              "granularities differ: quantize the float checkpoint instead)")
    expected = expected_tensors(cfg, stored_quant) if release is None else None

    # ---- 1. Read headers: names, shapes, dtypes (no tensor data yet).
    sources: dict[str, _Source] = {}
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
            raise CheckpointError(f"cannot read safetensors file {file}: {e}{_diagnose(file, cfg)}") from e
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
            sources[canon] = _Source(file, k)
            meta[canon] = headers[k]
    if wmap is not None:
        absent = [k for k, fname in wmap.items()
                  if not is_ignored(k, cfg) and canonical_name(k, cfg) not in sources]
        if absent:
            k = absent[0]
            raise CheckpointError(f"tensor {k!r} is listed in {INDEX_FILE_NAME} under {wmap[k]!r} but "
                                  f"that file does not contain it ({len(absent)} such tensors: "
                                  f"{_listing(absent)})")

    if release is not None:
        expected = expected_release_tensors(cfg, release, meta)

    # ---- 2. Presence / extras.
    missing = [n for n in expected if n not in sources]
    if missing:
        raise CheckpointError(f"checkpoint {root} is missing {len(missing)} of {len(expected)} expected "
                              f"tensors for {cfg.summary()}: {_listing(missing)}")
    extra = [n for n in sources if n not in expected]
    if extra:
        labels = [_label(n, sources[n]) for n in extra]
        raise CheckpointError(f"checkpoint {root} has {len(extra)} unexpected tensors (not used by "
                              f"{cfg.summary()}): {_listing(labels)}")

    # ---- 3. Shapes and dtype kinds (from headers).
    for name, info in expected.items():
        st_dtype, shape = meta[name]
        lab = _label(name, sources[name])
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
            hint = " (FP8/quantized checkpoints must be dequantized first)" if st_dtype.startswith("F8") else ""
            problems.append(f"tensor {lab}: expected dtype F16, BF16 or F32, got {st_dtype}{hint}")
    if problems:
        raise CheckpointError(f"checkpoint {root}: {len(problems)} tensor(s) fail validation:\n  "
                              + "\n  ".join(problems[:_MAX_LISTED])
                              + (f"\n  ... ({len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""))

    # ---- 4. Read data, check values, cast.
    total = sum(math.prod(meta[n][1]) * _itemsize(meta[n][0]) for n in expected)
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    # quantize on load tensor by tensor, right after reading (never all float copies at once)
    quantize_now = (models.spec_for_config(cfg).quantized_weight(quant)
                    if quant in QUANT_METHODS and quant != stored_quant else (lambda name: False))
    quantizer = quantize_for(quant) if quant in QUANT_METHODS else None
    pending: dict[str, torch.Tensor] = {}  # release weight or scale waiting for its partner
    partner = ({}
               if release is None else
               {n: s for n in expected if expected[n].kind in ("fp8", "mxfp4")
                for s in [models.spec_for_config(cfg).release_scale_name(n)]})
    partner.update({s: n for n, s in list(partner.items())})
    for name in expected:
        by_file.setdefault(sources[name].file, []).append(name)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"Loading {root.name}", disable=None if progress else True) as bar:
        for file, names in by_file.items():
            for batch in _read_batches(names, meta):
                try:
                    handle = safe_open(str(file), framework="pt")
                except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                    raise CheckpointError(f"cannot read safetensors file {file}: {e}{_diagnose(file, cfg)}") from e
                with handle as f:
                    for name in batch:
                        src = sources[name]
                        try:
                            t = raw = f.get_tensor(src.stored)
                        except Exception as e:  # truncated body, I/O error, ...
                            raise CheckpointError(f"cannot read tensor {_label(name, src)} from {file}: {e} "
                                                  "(truncated or corrupt file?)") from e
                        info = expected[name]
                        if is_release_kind(info.kind):
                            other = partner[name]
                            if other not in pending:
                                pending[name] = raw.clone()
                                del t, raw
                                bar.update(math.prod(meta[name][1]) * _itemsize(meta[name][0]))
                                continue
                            wname, sname = (other, name) if is_release_scale(info.kind) else (name, other)
                            w_t = pending.pop(other) if wname == other else raw
                            s_t = pending.pop(other) if sname == other else raw
                            out[wname] = decode_release_weight(wname, expected[wname].kind, w_t, s_t, release, cfg,
                                                               quant, dtype, quantizer)
                            del t, raw, w_t, s_t
                            bar.update(math.prod(meta[name][1]) * _itemsize(meta[name][0]))
                            continue
                        if info.kind == "int8":
                            pass
                        elif info.kind == "int":
                            problem = models.spec_for_config(cfg).check_int_tensor(name, t, cfg)
                            if problem:
                                raise CheckpointError(f"tensor {_label(name, src)}: {problem}")
                            if dtype is not None:
                                t = t.to(torch.int64)
                        else:
                            if check_finite:
                                _check_finite(name, src, t)
                            if dtype is not None:
                                want = torch.float32 if is_fp32_tensor(name, cfg) else dtype
                                if t.dtype != want:
                                    t = t.to(want)
                            if quantize_now(name):
                                t = quantizer(t)
                        # get_tensor's result lives in the file's mmap, which stays mapped (and
                        # its touched pages resident) while any tensor of it is alive: keep a
                        # private copy instead, so the mapping goes with this batch's handle.
                        out[name] = t.clone() if t is raw else t
                        del t, raw
                        bar.update(math.prod(meta[name][1]) * _itemsize(meta[name][0]))
    if release is not None:  # canonical order of the float table; scales are folded in
        out = {n: out[n] for n in expected if n in out}
    elif stored_quant is not None:
        out = assemble_w8a8(out, root)
    return cfg, out


#: Bytes read through one ``safe_open`` handle (one mmap) before it is closed and reopened:
#: bounds the file pages the process keeps mapped while it loads (peak RSS).
READ_BATCH_BYTES = 256 << 20


def _read_batches(names: list[str], meta: dict) -> Iterable[list[str]]:
    """``names`` in order, split into runs of at most :data:`READ_BATCH_BYTES` of stored data
    (a larger tensor is a run of its own)."""
    batch: list[str] = []
    size = 0
    for n in names:
        b = math.prod(meta[n][1]) * _itemsize(meta[n][0])
        if batch and size + b > READ_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(n)
        size += b
    if batch:
        yield batch


_ST_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
                "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}


def _itemsize(st_dtype: str) -> int:
    return _ST_ITEMSIZE.get(st_dtype, 1)


def _check_finite(name: str, src: _Source, t: torch.Tensor) -> None:
    """Raise CheckpointError if ``t`` holds NaN/Inf (checked in chunks of 16M elements)."""
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
        raise CheckpointError(f"tensor {_label(name, src)}: expected finite values, found {n_nan} NaN and "
                              f"{n_inf} Inf of {t.numel()} (first at index {list(idx)})")


# ====================================================================== writing
