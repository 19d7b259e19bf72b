"""Reading checkpoints of any registered model (Hugging Face directory layout, safetensors only).

A checkpoint directory holds ``config.json`` plus either ``model.safetensors`` or sharded
``model-0000i-of-0000N.safetensors`` files with ``model.safetensors.index.json``. The model's
spec (``models/<name>/weights.py``) names the tensors and maps stored names to canonical ones
(e.g. DeepSeek-V4's ``model.``-prefixed transformers names to its release names). Pickle checkpoints (``*.bin``, ``*.pt``) are refused: they can run code.

:func:`load_checkpoint` validates the headers (:func:`~.headers.read_headers`) and every tensor before
returning (presence, extras, shapes, dtype kinds, hash-routing table, NaN/Inf) and raises
:class:`CheckpointError` naming the tensor. The writer of seeded random checkpoints is
:mod:`llm_kernels.checkpoint.writer`.

See ``docs/checkpoints.md``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .. import models
from ..errors import CheckpointError
from ..models import load_config
from .headers import (
    INDEX_FILE_NAME,
    SHARD_RE,
    SINGLE_FILE_NAME,
    check_tensor_finite,
    checkpoint_quant,
    config_as_stored,
    diagnose_file,
    read_headers,
    st_itemsize,
    tensor_label,
)
from .names import QUANT_METHODS, is_fp32_tensor
from .quantized import assemble_w8a8, quantize_for
from .release import (
    RELEASE,
    decode_release_weight,
    is_release_kind,
    is_release_scale,
    read_config,
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

DEFAULT_MAX_BYTES = 8 * 2**30
TORCH_TO_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


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


def check_dtype_arg(dtype: torch.dtype | None, allowed: tuple[torch.dtype, ...], what: str) -> None:
    if dtype is not None and dtype not in allowed:
        raise ValueError(f"{what} must be one of {[str(d) for d in allowed]}, got {dtype!r}")


# ====================================================================== loading
def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
    progress: bool = True,
    quant: str | None = None,
    *,
    select: Callable[[str], bool] | None = None,
    mtp: bool = False,
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
        select: ``None`` reads every tensor. Otherwise a predicate on the canonical stored
            names (weights and their scales, e.g. ``layers.0.ffn.experts.3.w1.weight`` and
            ``...weight_scale``): tensors it rejects are neither read nor returned (their
            headers are still validated). Used by expert parallelism to load one rank's
            experts (:mod:`llm_kernels.distributed`); it must keep or reject a weight together
            with its scale.
        mtp: also load the multi-token-prediction blocks (DeepSeek-V4's ``mtp.{k}.*``,
            ``num_nextn_predict_layers`` of them; speculative decoding). False: the returned
            config has ``num_nextn_predict_layers = 0`` and stored ``mtp.*`` tensors are
            skipped (nothing of them is read).

    Returns:
        ``(cfg, tensors)``: the parsed config and ``{canonical name: tensor}`` holding exactly
        the names of :func:`~.names.expected_tensors` that ``select`` keeps (same order), with its shapes: weights
        ``[out, in]``, norms ``[dim]``, ``tid2eid`` ``[vocab_size, num_experts_per_tok]``.
        ``model.``-prefixed transformers names are mapped with :func:`~.names.canonical_name`;
        ``mtp.*`` tensors are skipped unless ``mtp``.

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
    n_mtp = getattr(cfg, "num_nextn_predict_layers", 0)  # HF's field for MTP blocks
    if mtp and not n_mtp:
        raise CheckpointError(f"{root / 'config.json'}: num_nextn_predict_layers is {n_mtp}: the checkpoint has "
                              "no MTP block to load (write one with make-checkpoint --mtp-layers 1)")
    if n_mtp and not mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)  # the model as loaded: no MTP block
    if mtp and config_as_stored(root, cfg) is not cfg:
        raise CheckpointError(f"{root / 'config.json'} announces num_nextn_predict_layers = {n_mtp} but the files hold "
                              "no mtp.* tensors (transformers' save_pretrained drops them): this checkpoint cannot "
                              "draft; write one with make-checkpoint --mtp-layers 1 or use the release files")
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
    # ---- 1-3. Headers: files, names, shapes, dtypes (no tensor data yet).
    h = read_headers(root, cfg, stored_quant, release)
    sources, expected = h.where, h.expected
    meta = {n: (w.dtype, w.shape) for n, w in sources.items()}

    # ---- 4. Read data, check values, cast.
    if select is not None:
        expected = {n: info for n, info in expected.items() if select(n)}
    total = sum(math.prod(meta[n][1]) * st_itemsize(meta[n][0]) for n in expected)
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
                    raise CheckpointError(f"cannot read safetensors file {file}: {e}{diagnose_file(file, cfg)}") from e
                with handle as f:
                    for name in batch:
                        src = sources[name]
                        try:
                            t = raw = f.get_tensor(src.stored)
                        except Exception as e:  # truncated body, I/O error, ...
                            raise CheckpointError(f"cannot read tensor {tensor_label(name, src)} from {file}: {e} "
                                                  "(truncated or corrupt file?)") from e
                        info = expected[name]
                        if is_release_kind(info.kind):
                            other = partner[name]
                            if other not in pending:
                                pending[name] = raw.clone()
                                del t, raw
                                bar.update(math.prod(meta[name][1]) * st_itemsize(meta[name][0]))
                                continue
                            wname, sname = (other, name) if is_release_scale(info.kind) else (name, other)
                            w_t = pending.pop(other) if wname == other else raw
                            s_t = pending.pop(other) if sname == other else raw
                            out[wname] = decode_release_weight(wname, expected[wname].kind, w_t, s_t, release, cfg,
                                                               quant, dtype, quantizer)
                            del t, raw, w_t, s_t
                            bar.update(math.prod(meta[name][1]) * st_itemsize(meta[name][0]))
                            continue
                        if info.kind == "int8":
                            pass
                        elif info.kind == "int":
                            problem = models.spec_for_config(cfg).check_int_tensor(name, t, cfg)
                            if problem:
                                raise CheckpointError(f"tensor {tensor_label(name, src)}: {problem}")
                            if dtype is not None:
                                t = t.to(torch.int64)
                        else:
                            if check_finite:
                                check_tensor_finite(name, src, t)
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
                        bar.update(math.prod(meta[name][1]) * st_itemsize(meta[name][0]))
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
        b = math.prod(meta[n][1]) * st_itemsize(meta[n][0])
        if batch and size + b > READ_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(n)
        size += b
    if batch:
        yield batch


# ====================================================================== writing
