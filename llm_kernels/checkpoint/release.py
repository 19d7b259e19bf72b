"""The official quantised release formats: DeepSeek-V4 (FP8 + MXFP4) and Qwen3-FP8.

A release checkpoint's ``config.json`` carries ``quantization_config`` with
``quant_method: "fp8"``, ``fmt: "e4m3"``, ``weight_block_size: [128, 128]`` (and for
DeepSeek-V4 ``scale_fmt: "ue8m0"``, ``expert_dtype: "fp4"``; V4 also writes ``expert_dtype``
at the top level). Per weight (the model spec's ``release_format``):

* **FP8**: ``<module>.weight`` float8_e4m3fn ``[N, K]`` + its block scale (DeepSeek:
  ``<module>.scale`` float8_e8m0fnu; Qwen3: ``<module>.weight_scale_inv`` bfloat16)
  ``[ceil(N/B0), ceil(K/B1)]`` (:mod:`llm_kernels.numerics.fp8`). Any 2-D weight of the
  model's ``int8`` set may come as FP8 (a weight stored F8_E4M3 is FP8 whatever its name).
* **MXFP4** (DeepSeek-V4 routed experts): ``<module>.weight`` int8/uint8 ``[N, K/2]`` E2M1
  pairs + ``<module>.scale`` float8_e8m0fnu/uint8 ``[N, K/32]``
  (:mod:`llm_kernels.numerics.mxfp4`). ``expert_dtype: "fp8"`` releases store the experts as
  FP8 instead; both are read.
* Everything else as in a float checkpoint.

Loading (:func:`decode_release_weight`, called by
:func:`~.safetensors_io.load_checkpoint` one weight at a time):

* ``quant="none"``: every weight dequantised (exact in float32; FP8 with UE8M0 scales and
  MXFP4 are exact in bfloat16 too);
* otherwise (``None`` = ``"int8_g32"``, or ``"int8"`` / ``"w8a8"``): MXFP4 weights stay
  4-bit (:class:`~llm_kernels.numerics.mxfp4.MXFP4Weight`, the W4A8 kernels read them);
  FP8 weights are dequantised to float32 and quantised once to the scheme's INT8 format
  (int8_g32 by default: one float16 scale per 32 inputs; the error against the dequantised
  weight is the scheme's own, ``docs/checkpoints.md``), one tensor at a time.

Writing (:func:`release_tensors`): the float weight encoded with
:func:`~llm_kernels.numerics.fp8.quantize_fp8_blocks` /
:func:`~llm_kernels.numerics.mxfp4.quantize_mxfp4`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import models
from ..errors import CheckpointError
from ..numerics.fp8 import FP8_SCALE_FORMATS, check_fp8_scale, dequantize_fp8_blocks, fp8_scale_shape, quantize_fp8_blocks
from ..numerics.mxfp4 import MXFP4_BLOCK, MXFP4Weight, quantize_mxfp4
from .tensor_info import TensorInfo

__all__ = ["RELEASE", "ReleaseFormat", "release_format_of", "expected_release_tensors", "release_dtype_problem",
           "decode_release_weight", "release_tensors", "release_quantization_config", "RELEASE_QUANT_METHOD"]

#: The scheme name :func:`~.safetensors_io.checkpoint_quant` returns for a release checkpoint.
RELEASE = "release"
RELEASE_QUANT_METHOD = "fp8"
_FP8_WEIGHT = "fp8"
_MXFP4_WEIGHT = "mxfp4"
_FP8_SCALE = "fp8_scale"
_MXFP4_SCALE = "mxfp4_scale"
_SCALE_DTYPES = {"F8_E8M0", "U8", "F32", "BF16", "F16"}


@dataclass(frozen=True)
class ReleaseFormat:
    """A release checkpoint's ``quantization_config``: FP8 block ``(B0, B1)``, the declared
    scale storage and expert dtype (the stored dtypes decide per tensor)."""

    block: tuple[int, int] = (128, 128)
    scale_fmt: str = "ue8m0"
    expert_dtype: str = "fp4"


def release_format_of(config: dict, path: Path) -> ReleaseFormat:
    """Parse ``config.json``'s ``quantization_config`` of a release checkpoint (``path`` for
    messages). Raises CheckpointError for an ``fmt`` other than e4m3, a malformed
    ``weight_block_size``, or an unknown ``expert_dtype``."""
    qc = config.get("quantization_config") or {}
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"{path}: quantization_config.fmt {fmt!r} is not supported (expected 'e4m3')")
    block = qc.get("weight_block_size", [128, 128])
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{path}: quantization_config.weight_block_size must be two positive integers "
                              f"such as [128, 128], got {block!r}")
    expert = qc.get("expert_dtype", config.get("expert_dtype")) or "fp8"
    if expert not in ("fp4", "fp8"):
        raise CheckpointError(f"{path}: expert_dtype must be 'fp4' or 'fp8', got {expert!r}")
    return ReleaseFormat(tuple(block), str(qc.get("scale_fmt", "float")), expert)


def _spec(cfg):
    spec = models.spec_for_config(cfg)
    if spec.release_format is None:
        raise CheckpointError(f"{cfg.summary()}: this model has no release format")
    return spec


def expected_release_tensors(cfg, fmt: ReleaseFormat, stored: dict[str, tuple[str, tuple[int, ...]]]
                             ) -> dict[str, TensorInfo]:
    """What a release checkpoint of ``cfg`` must hold, given the stored ``{canonical name:
    (safetensors dtype, shape)}``: each weight of the model's ``int8`` set stored F8_E4M3 is
    kind ``"fp8"`` and needs its block scale (kind ``"fp8_scale"``); a weight the model's
    release stores MXFP4 that is stored as I8/U8 is kind ``"mxfp4"`` (``[N, K/2]``) and needs
    ``[N, K/32]`` UE8M0 scales (``"mxfp4_scale"``); every other tensor is as in the float
    table. Order: the float table's, each scale right after its weight."""
    spec = _spec(cfg)
    quantizable = spec.quantized_weight("int8")
    out: dict[str, TensorInfo] = {}
    for name, info in spec.expected_float_tensors(cfg).items():
        st = stored.get(name, ("", ()))[0]
        if st == "F8_E4M3" and quantizable(name) and len(info.shape) == 2:
            out[name] = TensorInfo(info.shape, kind=_FP8_WEIGHT)
            out[spec.release_scale_name(name)] = TensorInfo(fp8_scale_shape(info.shape, fmt.block), kind=_FP8_SCALE)
        elif st in ("I8", "U8") and spec.release_format(name) == _MXFP4_WEIGHT:
            n, k = info.shape
            out[name] = TensorInfo((n, k // 2), kind=_MXFP4_WEIGHT)
            out[spec.release_scale_name(name)] = TensorInfo((n, k // MXFP4_BLOCK), kind=_MXFP4_SCALE)
        else:
            out[name] = info
    return out


def release_dtype_problem(kind: str, st_dtype: str) -> str | None:
    """The dtype problem of a release-kind tensor (None when ``st_dtype`` fits ``kind``;
    None for kinds this module does not define)."""
    if kind == _FP8_WEIGHT and st_dtype != "F8_E4M3":
        return f"expected dtype F8_E4M3 (FP8 weight), got {st_dtype}"
    if kind == _MXFP4_WEIGHT and st_dtype not in ("I8", "U8"):
        return f"expected dtype I8 or U8 (MXFP4 E2M1 pairs), got {st_dtype}"
    if kind == _MXFP4_SCALE and st_dtype not in ("F8_E8M0", "U8"):
        return f"expected dtype F8_E8M0 or U8 (UE8M0 scale per 32 inputs), got {st_dtype}"
    if kind == _FP8_SCALE and st_dtype not in _SCALE_DTYPES:
        return f"expected a block-scale dtype ({', '.join(sorted(_SCALE_DTYPES))}), got {st_dtype}"
    return None


def is_release_kind(kind: str) -> bool:
    return kind in (_FP8_WEIGHT, _MXFP4_WEIGHT, _FP8_SCALE, _MXFP4_SCALE)


def is_release_scale(kind: str) -> bool:
    return kind in (_FP8_SCALE, _MXFP4_SCALE)


def decode_release_weight(name: str, kind: str, weight: torch.Tensor, scale: torch.Tensor, fmt: ReleaseFormat,
                          cfg, scheme: str, dtype: torch.dtype | None, quantize) -> object:
    """One release weight as :func:`~.safetensors_io.load_checkpoint` returns it (module
    docstring): ``kind`` ``"fp8"`` or ``"mxfp4"``; ``scheme`` ``"none"`` (dequantise to
    ``dtype``, bfloat16 when None) or an INT8 scheme whose weight set decides whether an FP8
    weight is quantised by ``quantize`` (else dequantised to ``dtype``). Raises
    CheckpointError naming the tensor for NaN/zero/negative scales or NaN weights."""
    spec = models.spec_for_config(cfg)
    label = f"tensor {spec.release_scale_name(name)!r}"
    out_dtype = dtype or torch.bfloat16
    if kind == _MXFP4_WEIGHT:
        sb = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
        if bool((sb == 255).any()):
            idx = [int(i) for i in (sb == 255).nonzero()[0]]
            raise CheckpointError(f"{label}: expected UE8M0 scales (byte 255 is NaN), found "
                                  f"{int((sb == 255).sum())} NaN scale(s) (first at {idx})")
        w = MXFP4Weight(weight.view(torch.uint8).clone(), sb.clone())
        return w.dequantize(out_dtype) if scheme == "none" else w
    problem = check_fp8_scale(scale)
    if problem:
        raise CheckpointError(f"{label}: {problem}")
    try:
        f = dequantize_fp8_blocks(weight, scale, fmt.block)
    except ValueError as e:
        raise CheckpointError(f"tensor {name!r}: {e}") from e
    if not bool(torch.isfinite(f).all()):
        bad = int((~torch.isfinite(f)).sum())
        raise CheckpointError(f"tensor {name!r}: expected finite FP8 values, found {bad} NaN of {f.numel()}")
    if scheme != "none" and spec.quantized_weight(scheme)(name):
        return quantize(f)
    return f if out_dtype == torch.float32 else f.to(out_dtype)


# ---------------------------------------------------------------------------------- writing
def release_quantization_config(cfg) -> dict:
    """The ``quantization_config`` of ``cfg``'s model's release format."""
    spec = _spec(cfg)
    return {"quant_method": RELEASE_QUANT_METHOD, "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128], **dict(spec.release_quant_extra)}


def release_tensors(cfg, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The stored tensors of canonical float tensor ``name`` in ``cfg``'s model's release
    format: ``[(name, e4m3 weight), (scale name, block scale)]`` for an FP8 weight,
    ``[(name, int8 [N, K/2]), (scale name, float8_e8m0fnu [N, K/32])]`` for an MXFP4 one,
    ``[(name, t)]`` otherwise. Raises CheckpointError for a model without a release format."""
    spec = _spec(cfg)
    how = spec.release_format(name)
    if how == _FP8_WEIGHT:
        q, s = quantize_fp8_blocks(t, (128, 128), spec.release_scale_fmt)
        return [(name, q), (spec.release_scale_name(name), s)]
    if how == _MXFP4_WEIGHT:
        m = quantize_mxfp4(t)
        return [(name, m.packed.view(torch.int8)), (spec.release_scale_name(name), m.scale.view(torch.float8_e8m0fnu))]
    return [(name, t)]


def release_nbytes(cfg, info_by_name: dict[str, TensorInfo], float_itemsize) -> int:
    """Bytes of tensor data a release checkpoint of ``cfg`` stores (``float_itemsize(name)``:
    bytes per element of a tensor kept float)."""
    spec = _spec(cfg)
    total = 0
    for name, info in info_by_name.items():
        n = math.prod(info.shape)
        how = spec.release_format(name)
        if how == _FP8_WEIGHT:
            sc = FP8_SCALE_FORMATS[spec.release_scale_fmt].itemsize
            total += n + math.prod(fp8_scale_shape(info.shape, (128, 128))) * sc
        elif how == _MXFP4_WEIGHT:
            total += n // 2 + n // MXFP4_BLOCK
        else:
            total += n * float_itemsize(name)
    return total


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from e


def quant_label(stored: str | None, quant: str | None) -> str:
    """How a checkpoint whose ``config.json`` declares ``stored`` (``checkpoint_quant``)
    runs under ``--quant quant``, for the CLI header: e.g. ``"as stored: release (FP8 ->
    int8_g32 at load; MXFP4 weights stay 4-bit)"``."""
    if stored == RELEASE:
        scheme = quant if quant not in (None, "none") else "int8_g32"
        if quant == "none":
            return "none (release dequantized to float)"
        return f"{quant or 'as stored'}: release (FP8 -> {scheme} at load; MXFP4 weights stay 4-bit)"
    if quant is None:
        return f"as stored ({stored or 'float'})"
    return quant
