"""Writing seeded random DeepSeek-V4 checkpoints in the Hugging Face layout.

:func:`write_random_checkpoint` writes ``config.json`` and safetensors (DeepSeek's release
names, which transformers loads) with deterministic random weights at scales that keep
activations O(1) through the whole model. See ``docs/checkpoints.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import models
from ..errors import CheckpointError
from ..numerics.group_quant import GroupQuantWeight
from ..numerics.quant import QuantWeight
from .names import QUANT_METHODS, TensorInfo, expected_tensors, is_fp32_tensor
from .quantized import quantization_config, quantize_weights
from .random_tokenizer import TOKENIZER_FILES, write_random_tokenizer
from .safetensors_io import (
    DEFAULT_MAX_BYTES,
    DTYPE_NAMES,
    INDEX_FILE_NAME,
    SHARD_RE,
    SINGLE_FILE_NAME,
    TORCH_TO_ST,
    check_dtype_arg,
    checkpoint_quant,
    fmt_bytes,
    load_checkpoint,
    shard_file_name,
)

__all__ = ["write_random_checkpoint", "checkpoint_nbytes", "quantize_checkpoint", "WRITER_VERSION"]

# Bumped whenever write_random_checkpoint writes different files for the same arguments
# (the embedded default checkpoints are keyed on it). 2: the tokenizer files.
WRITER_VERSION = 2


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


def _st_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, int]:
    """safetensors header bytes (8-byte length + JSON padded to 8 bytes) and data size."""
    hdr: dict[str, object] = {"__metadata__": metadata}
    off = 0
    for name, dt, shape in entries:
        n = math.prod(shape) * dt.itemsize
        hdr[name] = {"dtype": TORCH_TO_ST[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(hdr, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js, off


def _write_tensor_bytes(fh, t: torch.Tensor) -> None:
    t = t.contiguous()
    if t.numel():
        fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


def write_random_checkpoint(
    cfg,
    out_dir: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    weight_scale: float = 1.0,
    shard_size_bytes: int | None = None,
    progress: bool = True,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    tokenizer: bool = True,
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
        shard_size_bytes: None writes one ``model.safetensors``. Otherwise tensors (in
            :func:`expected_tensors` order) are packed greedily into shards of at most this many
            data bytes (a larger tensor gets a shard of its own) named
            ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``; if
            everything fits in one shard, a single ``model.safetensors`` is written (as
            transformers does).
        max_bytes: refuse (ValueError, nothing written) when :func:`checkpoint_nbytes` exceeds
            it; None disables the limit. Also refused when the disk lacks the space.
        progress: tqdm bar over tensors.
        tokenizer: also write a small deterministic byte-level BPE tokenizer sized to the
            vocabulary, a chat template and ``generation_config.json``
            (:func:`~.random_tokenizer.write_random_tokenizer`; skipped for a vocabulary
            below 261 ids).

    Files are written to a temporary name and renamed. Weight files of an earlier checkpoint
    in ``out_dir`` (``model.safetensors``, ``model-*-of-*.safetensors``, the index) that the
    new checkpoint does not use are removed, so the directory always holds one checkpoint.

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: ``dtype`` not float32/bfloat16/float16, bad ``shard_size_bytes``, or the
            checkpoint would exceed ``max_bytes`` / the free disk space.
    """
    check_dtype_arg(dtype, (torch.float32, torch.bfloat16, torch.float16), "write_random_checkpoint dtype")
    if shard_size_bytes is not None and shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    out = Path(out_dir)
    expected = expected_tensors(cfg)
    nbytes = checkpoint_nbytes(cfg, dtype)
    if max_bytes is not None and nbytes > max_bytes:
        raise ValueError(
            f"refusing to write a {fmt_bytes(nbytes)} checkpoint for {cfg.summary()} "
            f"(max_bytes = {fmt_bytes(max_bytes)}); use fewer layers / experts, e.g. "
            "preset('flash', num_hidden_layers=1, n_routed_experts=4), or raise max_bytes")
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if nbytes + (1 << 20) > free:
        raise ValueError(f"refusing to write a {fmt_bytes(nbytes)} checkpoint to {out}: only "
                         f"{fmt_bytes(free)} free on that disk")

    # Plan shards.
    entries = [(n, _storage_dtype(n, info, dtype, cfg), info.shape) for n, info in expected.items()]
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for e in entries:
        n = math.prod(e[2]) * e[1].itemsize
        if shard_size_bytes is not None and shards[-1] and size + n > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    names = [SINGLE_FILE_NAME] if len(shards) == 1 else [shard_file_name(i + 1, len(shards))
                                                         for i in range(len(shards))]

    tmp_paths: list[Path] = []
    try:
        with tqdm(total=len(entries), unit="tensor", desc=f"Writing {out.name}",
                  disable=None if progress else True) as bar:
            for fname, shard in zip(names, shards):
                header, _ = _st_header(shard, {"format": "pt"})
                tmp = out / f".{fname}.tmp-{os.getpid()}"
                tmp_paths.append(tmp)
                with open(tmp, "wb") as fh:
                    fh.write(header)
                    for name, dt, shape in shard:
                        t = _random_tensor(name, expected[name], cfg, seed, weight_scale).to(dt)
                        assert tuple(t.shape) == tuple(shape)
                        _write_tensor_bytes(fh, t)
                        del t
                        bar.update(1)
        for fname, tmp in zip(names, tmp_paths):
            os.replace(tmp, out / fname)
        tmp_paths = []
        written = set(names)
        if len(shards) > 1:
            wmap = {n: fname for fname, shard in zip(names, shards) for n, _, _ in shard}
            _atomic_write_text(out / INDEX_FILE_NAME,
                               json.dumps({"metadata": {"total_size": nbytes}, "weight_map": wmap}, indent=2))
            written.add(INDEX_FILE_NAME)
        for p in out.iterdir():  # stale weights of an earlier checkpoint
            if p.name not in written and (p.name in (SINGLE_FILE_NAME, INDEX_FILE_NAME) or SHARD_RE.match(p.name)):
                p.unlink()
        if tokenizer:
            write_random_tokenizer(out, cfg.vocab_size)
        hf = cfg.to_hf_dict()
        hf["dtype"] = DTYPE_NAMES[dtype]
        _atomic_write_text(out / "config.json", json.dumps(hf, indent=2) + "\n")  # last: marks it complete
    finally:
        for tmp in tmp_paths:
            tmp.unlink(missing_ok=True)
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def quantize_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True,
                        scheme: str = "w8a8") -> Path:
    """Convert a float HF checkpoint directory to an INT8 format in ``out_dir``:
    ``scheme="w8a8"`` (the spec's W8A8 set) or ``"int8"`` (every 2-D weight a Q8-class
    format quantises; :mod:`.quantized`).

    The source's tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
    ``generation_config.json``, ...) are copied along.

    Raises CheckpointError/ConfigError as :func:`load_checkpoint` does for a bad source,
    CheckpointError when the source is already quantized, ValueError for another scheme."""
    if scheme not in QUANT_METHODS:
        raise ValueError(f"scheme must be one of {sorted(QUANT_METHODS)}, got {scheme!r}")
    stored = checkpoint_quant(src)
    if stored is not None:
        raise CheckpointError(f"{src} is already a quantized ({stored}) checkpoint")
    cfg, weights = load_checkpoint(src, dtype=None, progress=progress)
    q = quantize_weights(weights, cfg, progress=progress, scheme=scheme)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in q.items():
        if isinstance(t, QuantWeight):
            tensors[name] = t.qweight.contiguous()
            tensors[name + "_scale"] = t.scale.float().contiguous()
        elif isinstance(t, GroupQuantWeight):
            tensors[name] = t.qweight.contiguous()
            tensors[name + "_scale"] = t.scale.contiguous()  # float16 [out, in/G]
        else:
            tensors[name] = t.contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    conf = json.loads((Path(src) / "config.json").read_text())
    conf["quantization_config"] = quantization_config(cfg, scheme)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    for name in TOKENIZER_FILES:  # the tokenizer travels with the weights
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, out / name)
    return out
