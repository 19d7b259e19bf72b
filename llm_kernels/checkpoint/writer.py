"""The checkpoint writers: seeded random checkpoints and ``quantize``.

* :func:`write_random_checkpoint` (``make-checkpoint``) writes ``config.json`` and safetensors
  (the model's canonical names, which transformers loads) with deterministic random weights at
  scales that keep activations O(1) through the whole model, as floats or (``format=
  "release"``) in the model's release format.
* :func:`quantize_checkpoint` (``quantize``) converts a float checkpoint into one of this
  project's INT8 formats (:mod:`.quantized`) or the release format.

Both stream: a tensor is made or read, converted, written to the current shard
(:class:`~.shards.ShardWriter`) and dropped, so memory stays at about one tensor whatever the
model size. Both write into a hidden staging folder that becomes the output folder only once
the checkpoint is complete, and refuse unsafe output folders (:mod:`.output_dir`). See
``docs/checkpoints.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .. import models
from ..errors import CheckpointError
from ..numerics.group_quant import GroupQuantWeight
from ..numerics.quant import QuantWeight
from .names import QUANT_METHODS, TensorInfo, expected_tensors, is_fp32_tensor
from .output_dir import atomic_write_text, check_output_dir, staged_output_dir
from .quantized import quantization_config, quantize_for
from .random_tokenizer import TOKENIZER_FILES, write_random_tokenizer
from .release import RELEASE, release_nbytes, release_quantization_config, release_tensors
from .safetensors_io import DEFAULT_MAX_BYTES, DTYPE_NAMES, check_dtype_arg, checkpoint_quant, fmt_bytes
from .shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter
from .source import StreamingSource

__all__ = ["write_random_checkpoint", "checkpoint_nbytes", "quantize_checkpoint", "WRITER_VERSION",
           "DEFAULT_MAX_SHARD_SIZE", "SIDE_FILES", "FORMATS", "QUANTIZE_FORMATS"]

# Bumped whenever write_random_checkpoint writes different files for the same arguments
# (the embedded default checkpoints are keyed on it). 2: the tokenizer files.
WRITER_VERSION = 2

#: Files that travel with the weights: the tokenizer (fast and slow forms), the chat
#: template and the generation defaults.
SIDE_FILES = tuple(dict.fromkeys((*TOKENIZER_FILES, "chat_template.jinja", "special_tokens_map.json",
                                  "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")))

#: ``write_random_checkpoint`` formats: ``"float"`` (``dtype`` everywhere) or ``"release"``
#: (the model's official quantised release format, :mod:`.release`).
FORMATS = ("float", "release")
#: ``quantize_checkpoint`` formats: ``"int8"`` (this project's INT8 formats, by ``scheme``) or
#: ``"release"``.
QUANTIZE_FORMATS = ("int8", "release")


def _storage_dtype(name: str, info: TensorInfo, dtype: torch.dtype, cfg) -> torch.dtype:
    if info.kind == "int":
        return torch.int64
    return torch.float32 if is_fp32_tensor(name, cfg) else dtype


def checkpoint_nbytes(cfg, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of tensor data :func:`write_random_checkpoint` writes for ``cfg`` with storage
    ``dtype`` (FP32-suffix tensors count 4 bytes/element, ``tid2eid`` 8). The safetensors
    headers and ``config.json`` add a few KiB on top. Pure function of the config."""
    total = 0
    for name, info in expected_tensors(cfg).items():
        total += math.prod(info.shape) * _storage_dtype(name, info, dtype, cfg).itemsize
    return total


def _seed_for(seed: int, name: str) -> int:
    """Stable 63-bit per-tensor seed from (seed, canonical name)."""
    h = hashlib.blake2b(f"{int(seed)}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _random_tensor(name: str, info: TensorInfo, cfg, seed: int, weight_scale: float) -> torch.Tensor:
    """The float32 (int64 for index tables) random init of one tensor by the model's
    ``init_tensor`` rule, from a generator seeded by (seed, name); see docs/checkpoints.md."""
    g = torch.Generator().manual_seed(_seed_for(seed, name))
    return models.spec_for_config(cfg).init_tensor(name, info, cfg, g, weight_scale)




def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the :data:`SIDE_FILES` ``src`` holds into ``dst``; return their names."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _write_checkpoint(out: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]], config: dict, *,
                      count: int, nbytes_bound: int, shard_size_bytes: int | None, force: bool, progress: bool,
                      sources: tuple = (), extras: Callable[[Path], object] | None = None) -> Path:
    """Stream ``tensors`` into shards in a staging folder of ``out``, call ``extras(stage)``
    (tokenizer files), write ``config.json`` last and move the folder into place
    (:func:`~.output_dir.staged_output_dir`). ``count`` sizes the progress bar,
    ``nbytes_bound`` (an upper bound of the tensor bytes) is checked against the free disk."""
    out = Path(out)
    with staged_output_dir(out, sources, force) as stage:
        free = shutil.disk_usage(stage).free
        if nbytes_bound + (1 << 20) > free:
            raise ValueError(f"refusing to write a {fmt_bytes(nbytes_bound)} checkpoint to {out}: only "
                             f"{fmt_bytes(free)} free on that disk")
        writer = ShardWriter(stage, shard_size_bytes)
        try:
            with tqdm(total=count, unit="tensor", desc=f"Writing {out.name}",
                      disable=None if progress else True) as bar:
                for name, t in tensors:
                    writer.add(name, t)
                    del t
                    bar.update(1)
        except BaseException:
            writer.abort()
            raise
        writer.finish()
        if extras is not None:
            extras(stage)
        atomic_write_text(stage / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def write_random_checkpoint(
    cfg,
    out_dir: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    weight_scale: float = 1.0,
    shard_size_bytes: int | None = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    tokenizer: bool = True,
    force: bool = False,
    format: str = "float",
) -> Path:
    """Write a random, deterministic checkpoint of ``cfg``'s model that :func:`load_checkpoint`
    and ``transformers``' ``from_pretrained`` both read. Init rules per model:
    ``models/<name>/weights.py`` ``init_tensor`` (Qwen3: Linear ~ N(0, weight_scale/sqrt(in)),
    norms ~ 1 + N(0, 0.1), embed ~ N(0, 1), lm_head ~ N(0, 1/sqrt(D))).

    Writes ``out_dir/config.json`` (``cfg.to_hf_dict()`` plus ``"dtype"``) and the tensors of
    :func:`~.names.expected_tensors` under their canonical (release) names, metadata
    ``{"format": "pt"}``. Storage dtypes: ``dtype`` for matrices and norm weights, float32 for
    the model's ``is_fp32_tensor`` tensors, int64 for ``tid2eid``. Values come from a
    per-tensor ``torch.Generator`` seeded from ``(seed, name)``, so a tensor's values do not
    depend on the other tensors of the config (adding experts or layers leaves the rest
    unchanged) and files are byte-identical across runs. DeepSeek-V4 init scales (activations O(1)):
    Linear ``[out, in]`` ~ N(0, weight_scale/sqrt(in)); RMSNorm weights ~ 1 + N(0, 0.1);
    ``embed`` ~ N(0, 1); ``head`` and ``ffn.gate.weight`` ~ N(0, 1/sqrt(D)); ``hc_*_fn`` ~
    N(0, 1/sqrt(hc_mult*D)); ``hc_*_base`` ~ N(0, 0.5); ``hc_*_scale`` ~ U(0.5, 1.5);
    ``attn_sink`` ~ N(0, 1); compressor ``ape`` ~ N(0, 0.5); ``gate.bias`` ~ N(0, 0.1);
    ``tid2eid`` rows are K distinct expert ids drawn uniformly.

    Args:
        shard_size_bytes: data bytes per shard (default 5 GB, :data:`DEFAULT_MAX_SHARD_SIZE`).
            Tensors (in :func:`expected_tensors` order) are packed greedily (a larger tensor
            gets a shard of its own) into ``model-0000i-of-0000N.safetensors`` plus
            ``model.safetensors.index.json``; if everything fits in one shard, a single
            ``model.safetensors`` is written (as transformers does). None: always one file.
        max_bytes: refuse (ValueError, nothing written) when :func:`checkpoint_nbytes` exceeds
            it; None disables the limit. Also refused when the disk lacks the space.
        progress: tqdm bar over tensors.
        tokenizer: also write a small deterministic byte-level BPE tokenizer sized to the
            vocabulary, a chat template and ``generation_config.json``
            (:func:`~.random_tokenizer.write_random_tokenizer`; skipped for a vocabulary
            below 261 ids).
        force: replace a non-empty ``out_dir`` (only once the new checkpoint is complete).
        format: ``"float"``, or ``"release"``: each tensor (rounded to its storage dtype
            first) encoded by :func:`~.release.release_tensors` in the model's official
            release format (DeepSeek-V4: FP8 e4m3 + UE8M0 128x128 block scales, MXFP4 routed
            experts; Qwen3: FP8 + bfloat16 ``weight_scale_inv``), ``config.json`` carrying
            :func:`~.release.release_quantization_config`. The same bytes as ``quantize
            --format release`` of the float checkpoint.

    The checkpoint is written into a hidden sibling folder and renamed to ``out_dir`` when
    complete (:mod:`.output_dir`): a failure or interruption leaves ``out_dir`` as it was.

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: ``dtype`` not float32/bfloat16/float16, bad ``shard_size_bytes`` or
            ``format``, or the checkpoint would exceed ``max_bytes`` / the free disk space.
        OutputDirError: ``out_dir`` is not empty and not ``force`` (or is not a folder).
        CheckpointError: ``format="release"`` for a model without a release format.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    check_dtype_arg(dtype, (torch.float32, torch.bfloat16, torch.float16), "write_random_checkpoint dtype")
    if shard_size_bytes is not None and shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    expected = expected_tensors(cfg)
    nbytes = checkpoint_nbytes(cfg, dtype)
    if format == "release":
        nbytes = release_nbytes(cfg, expected, lambda n: _storage_dtype(n, expected[n], dtype, cfg).itemsize)
    if max_bytes is not None and nbytes > max_bytes:
        raise ValueError(
            f"refusing to write a {fmt_bytes(nbytes)} checkpoint for {cfg.summary()} "
            f"(max_bytes = {fmt_bytes(max_bytes)}); use fewer layers / experts, e.g. "
            "preset('flash', num_hidden_layers=1, n_routed_experts=4), or raise max_bytes")
    check_output_dir(out_dir, force=force)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, info in expected.items():
            t = _random_tensor(name, info, cfg, seed, weight_scale).to(_storage_dtype(name, info, dtype, cfg))
            assert tuple(t.shape) == tuple(info.shape)
            yield name, t
            del t  # before the next tensor is made: a generator frame keeps its locals alive

    hf = cfg.to_hf_dict()
    hf["dtype"] = DTYPE_NAMES[dtype]
    items, count = tensors(), len(expected)
    if format == "release":
        hf["quantization_config"] = release_quantization_config(cfg)
        items, count = _release_tensors(items, cfg), _release_count(cfg)
    extras = (lambda stage: write_random_tokenizer(stage, cfg.vocab_size)) if tokenizer else None
    return _write_checkpoint(out_dir, items, hf, count=count, nbytes_bound=nbytes,
                             shard_size_bytes=shard_size_bytes, force=force, progress=progress, extras=extras)


def _int8_tensors(source: Iterable[tuple[str, torch.Tensor]], cfg, scheme: str
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensors of ``scheme``'s INT8 format, one source tensor at a time: a weight of
    the scheme's set becomes ``<name>`` int8 ``[out, in]`` + ``<name>_scale`` (float32
    ``[out]``, or float16 ``[out, in/G]`` for a group-scaled scheme); the rest as given."""
    is_int8 = models.spec_for_config(cfg).quantized_weight(scheme)
    quant = quantize_for(scheme)
    for name, t in source:
        if not is_int8(name):
            yield name, t
            del t
            continue
        q = quant(t)
        del t
        if isinstance(q, QuantWeight):
            yield name, q.qweight
            yield name + "_scale", q.scale.float()
        elif isinstance(q, GroupQuantWeight):
            yield name, q.qweight
            yield name + "_scale", q.scale  # float16 [out, in/G]
        else:  # pragma: no cover - quantize_for returns one of the two
            raise TypeError(f"quantizer of {scheme!r} returned {type(q).__name__} for {name!r}")
        del q


def _release_tensors(source: Iterable[tuple[str, torch.Tensor]], cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensors of the release format, one source tensor at a time."""
    for name, t in source:
        stored = release_tensors(cfg, name, t)
        del t
        while stored:
            yield stored.pop(0)


def _release_count(cfg) -> int:
    """Stored tensors of a release checkpoint of ``cfg`` (a scale per FP8 / MXFP4 weight)."""
    how = models.spec_for_config(cfg).release_format
    return sum(2 if how is not None and how(n) else 1 for n in expected_tensors(cfg))


def _float_dtype(conf: dict) -> torch.dtype:
    """The float storage dtype a config declares (``dtype`` / ``torch_dtype``), else bfloat16."""
    names = {v: k for k, v in DTYPE_NAMES.items()}
    return names.get(conf.get("dtype") or conf.get("torch_dtype"), torch.bfloat16)


def quantize_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True,
                        scheme: str | None = None, force: bool = False,
                        shard_size_bytes: int | None = DEFAULT_MAX_SHARD_SIZE, format: str = "int8") -> Path:
    """Convert the checkpoint folder ``src`` (float, or an official release) into ``out_dir``.

    ``format="int8"``: one of this project's INT8 formats (:mod:`.quantized`), ``scheme``
    ``"w8a8"`` (default; the spec's W8A8 set), ``"int8"`` (every 2-D weight a Q8-class format
    quantises) or ``"int8_g32"`` (the ``int8`` set, one scale per 32 inputs). A release source
    is read dequantised (FP8 / MXFP4 -> float32, exact for UE8M0 scales; as
    ``load_checkpoint(src, quant="none")``): the scheme's weights are quantised from that, the
    release's other FP8 weights are stored in the config's float dtype (bfloat16 by default).
    Other tensors keep their stored dtype.

    ``format="release"``: a float source encoded in the model's release format
    (:func:`~.release.release_tensors`; ``scheme`` must be None).

    Streams: each tensor is read, checked (as :func:`load_checkpoint` checks it), converted and
    written to the current shard (``shard_size_bytes`` data bytes each, default 5 GB; one
    ``model.safetensors`` when it fits), so peak memory is about one float tensor and its
    converted copy, not the model. The source's :data:`SIDE_FILES` (tokenizer,
    ``generation_config.json``, chat template, ...) are copied along; ``config.json`` is the
    source's with the new ``quantization_config``. Output folder rules: :mod:`.output_dir`.

    Raises:
        OutputDirError: ``out_dir`` is ``src``, inside it or contains it (symlinks resolved),
            or is not empty and not ``force``; raised before anything is read or written.
        CheckpointError / ConfigError: a bad source (as :func:`load_checkpoint`), a source
            already in one of this project's INT8 formats, a release source with
            ``format="release"``, a model without a release format.
        ValueError: an unknown ``scheme`` or ``format``, a ``scheme`` with
            ``format="release"``, a non-positive ``shard_size_bytes``.
    """
    if format not in QUANTIZE_FORMATS:
        raise ValueError(f"format must be one of {QUANTIZE_FORMATS}, got {format!r}")
    if format == "release" and scheme is not None:
        raise ValueError(f"scheme {scheme!r} applies to format 'int8' (the release format has its own)")
    scheme = scheme or ("w8a8" if format == "int8" else None)
    if format == "int8" and scheme not in QUANT_METHODS:
        raise ValueError(f"scheme must be one of {sorted(QUANT_METHODS)}, got {scheme!r}")
    if shard_size_bytes is not None and shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    src = Path(src)
    check_output_dir(out_dir, [src], force, flag="--out")
    stored = checkpoint_quant(src)
    if stored not in (None, RELEASE):
        raise CheckpointError(f"{src} is already a quantized ({stored}) checkpoint; quantize the float checkpoint")
    if stored == RELEASE and format == "release":
        raise CheckpointError(f"{src} is already a release-format checkpoint")
    source = StreamingSource(src)
    cfg = source.cfg
    conf = json.loads((src / "config.json").read_text())
    if format == "release":
        conf["quantization_config"] = release_quantization_config(cfg)
        items, count, bound = _release_tensors(source, cfg), _release_count(cfg), source.nbytes
    else:
        conf["quantization_config"] = quantization_config(cfg, scheme)
        items, count = source, len(expected_tensors(cfg, scheme))
        bound = source.nbytes + 4 * count
        if source.release is not None:
            items, bound = _dequantized(source, cfg, scheme, _float_dtype(conf)), checkpoint_nbytes(cfg) + 4 * count
        items = _int8_tensors(items, cfg, scheme)
    return _write_checkpoint(out_dir, items, conf, count=count, nbytes_bound=bound, shard_size_bytes=shard_size_bytes,
                             force=force, progress=progress, sources=(src,),
                             extras=lambda stage: _copy_side_files(src, stage))


def _dequantized(source: StreamingSource, cfg, scheme: str, float_dtype: torch.dtype
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """A release source's tensors for an INT8 ``scheme``: the scheme's weights as decoded
    (float32), the release's other decoded weights cast to ``float_dtype``."""
    is_int8 = models.spec_for_config(cfg).quantized_weight(scheme)
    for name, t in source:
        yield name, (t.to(float_dtype) if source.is_dequantized(name) and not is_int8(name) else t)
        del t
