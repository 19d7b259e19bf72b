"""Checkpoint I/O: random writer, validating loader, transformers interop, malformed inputs."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llm_kernels.checkpoint import checkpoint_nbytes, expected_tensors, load_checkpoint, write_random_checkpoint
from llm_kernels.models.deepseek_v4.weights import FP32_TENSOR_SUFFIXES, canonical_name, is_fp32_tensor
from llm_kernels.errors import CheckpointError, ConfigError
from llm_kernels.models.deepseek_v4.config import DeepSeekV4Config
from llm_kernels.models import preset

ST = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _cfg() -> DeepSeekV4Config:
    """preset('mini'): SWA, CSA, HCA layers, one hash layer, 8 experts top-2, V=512, D=128."""
    return preset("mini")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A bf16 random checkpoint of the mini config (read-only: copy before mutating)."""
    return write_random_checkpoint(_cfg(), tmp_path_factory.mktemp("ckpt") / "mini", seed=0, progress=False)


@pytest.fixture
def bad(ckpt, tmp_path) -> Path:
    """A private copy of ``ckpt`` to corrupt."""
    d = tmp_path / "bad"
    shutil.copytree(ckpt, d)
    return d


def _raw(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory as stored (single file or shards)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _rewrite(d: Path, fn) -> None:
    tensors = load_file(d / ST)
    fn(tensors)
    save_file(tensors, d / ST, metadata={"format": "pt"})


def _raises(d: Path, *needles: str, **kw) -> str:
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(d, progress=False, **kw)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in error message: {msg}"
    return msg


# ============================================================== round trip / dtypes
def test_round_trip_as_stored(ckpt):
    cfg, ts = load_checkpoint(ckpt, progress=False)
    assert cfg == _cfg()
    exp = expected_tensors(cfg)
    assert list(ts) == list(exp)
    raw = _raw(ckpt)
    assert set(raw) == set(exp)
    for name, info in exp.items():
        t = ts[name]
        assert tuple(t.shape) == info.shape, name
        if info.kind == "int":
            assert t.dtype == torch.int64
        elif is_fp32_tensor(name):
            assert t.dtype == torch.float32, name
        else:
            assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, raw[name]), name
    json_cfg = json.loads((ckpt / "config.json").read_text())
    assert json_cfg["dtype"] == "bfloat16"
    with safe_open(str(ckpt / ST), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_fp32_suffixes_cover_expected_names():
    # with an MTP block: its enorm / hnorm are fp32 too (spec §4)
    names = [n for n in expected_tensors(_cfg().replace(num_nextn_predict_layers=1), quant="w8a8")
             if is_fp32_tensor(n)]
    for suffix in FP32_TENSOR_SUFFIXES:
        assert any(n.endswith(suffix) for n in names), suffix
    assert not is_fp32_tensor("layers.0.attn.wq_a.weight")
    assert not is_fp32_tensor("layers.1.attn.compressor.wgate.weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_casts(ckpt, dtype):
    _, stored = load_checkpoint(ckpt, progress=False)
    _, ts = load_checkpoint(ckpt, dtype=dtype, progress=False)
    for name, t in ts.items():
        s = stored[name]
        if name.endswith("tid2eid"):
            assert t.dtype == torch.int64 and torch.equal(t, s)
        elif is_fp32_tensor(name):
            assert t.dtype == torch.float32 and torch.equal(t, s), name
        else:
            assert t.dtype == dtype and torch.equal(t, s.to(dtype)), name


def test_fp32_checkpoint_loaded_as_bf16_keeps_fp32_tensors(tmp_path):
    d = write_random_checkpoint(_cfg(), tmp_path / "f32", dtype=torch.float32, progress=False)
    assert json.loads((d / "config.json").read_text())["dtype"] == "float32"
    raw = _raw(d)
    assert all(t.dtype == torch.float32 for n, t in raw.items() if not n.endswith("tid2eid"))
    _, ts = load_checkpoint(d, dtype=torch.bfloat16, progress=False)
    for name, t in ts.items():
        if name.endswith("tid2eid"):
            continue
        want = torch.float32 if is_fp32_tensor(name) else torch.bfloat16
        assert t.dtype == want, name
        assert torch.equal(t, raw[name].to(want)), name


def test_bad_dtype_arguments(ckpt, tmp_path):
    with pytest.raises(ValueError):
        load_checkpoint(ckpt, dtype=torch.float16, progress=False)
    with pytest.raises(ValueError):
        write_random_checkpoint(_cfg(), tmp_path / "x", dtype=torch.int32, progress=False)


# ============================================================== determinism / sharding
def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_deterministic(ckpt, tmp_path):
    again = write_random_checkpoint(_cfg(), tmp_path / "again", seed=0, progress=False)
    assert _digest(again) == _digest(ckpt)
    other = write_random_checkpoint(_cfg(), tmp_path / "other", seed=1, progress=False)
    a, b = _raw(ckpt), _raw(other)
    assert set(a) == set(b)
    assert all(not torch.equal(a[n], b[n]) for n in a)


def test_per_tensor_seeding_is_independent_of_config_size(ckpt, tmp_path):
    bigger = _cfg().replace(n_routed_experts=12)
    d = write_random_checkpoint(bigger, tmp_path / "e12", seed=0, progress=False)
    a, b = _raw(ckpt), _raw(d)
    for name in ("layers.1.ffn.experts.3.w1.weight", "layers.2.attn.wq_a.weight", "embed.weight",
                 "layers.1.attn.compressor.ape", "layers.3.ffn.shared_experts.w2.weight"):
        assert torch.equal(a[name], b[name]), name
    assert "layers.1.ffn.experts.11.w2.weight" in b


def test_sharded_equals_unsharded(ckpt, tmp_path):
    cfg = _cfg()
    shard = 200_000
    d = write_random_checkpoint(cfg, tmp_path / "sharded", seed=0, shard_size_bytes=shard, progress=False)
    index = json.loads((d / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (d / ST).exists()
    assert index["metadata"]["total_size"] == checkpoint_nbytes(cfg, torch.bfloat16)
    assert set(index["weight_map"]) == set(expected_tensors(cfg))
    for f in files:  # every shard within the limit unless it holds a single oversized tensor
        with safe_open(str(d / f), framework="pt") as h:
            keys = list(h.keys())
            size = sum(h.get_tensor(k).nbytes for k in keys)
        assert size <= shard or len(keys) == 1
    _, a = load_checkpoint(ckpt, progress=False)
    _, b = load_checkpoint(d, progress=False)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # Rewriting unsharded into the same directory (force=True) replaces the shards and the index.
    write_random_checkpoint(cfg, d, seed=0, shard_size_bytes=None, progress=False, force=True)
    tok = ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]  # the random tokenizer
    assert sorted(p.name for p in d.iterdir()) == sorted(["config.json", ST, *tok])


def test_init_scales(ckpt):
    cfg, ts = load_checkpoint(ckpt, dtype=torch.float32, progress=False)
    D, HC = cfg.hidden_size, cfg.hc_mult

    def std(n):
        return ts[n].std().item()

    assert std("embed.weight") == pytest.approx(1.0, rel=0.05)
    assert std("head.weight") == pytest.approx(1 / math.sqrt(D), rel=0.05)
    assert std("layers.1.attn.wq_b.weight") == pytest.approx(1 / math.sqrt(cfg.q_lora_rank), rel=0.05)
    assert std("layers.1.ffn.experts.0.w2.weight") == pytest.approx(1 / math.sqrt(cfg.moe_intermediate_size), rel=0.1)
    assert std("layers.0.hc_attn_fn") == pytest.approx(1 / math.sqrt(HC * D), rel=0.05)
    assert ts["layers.0.attn_norm.weight"].mean().item() == pytest.approx(1.0, abs=0.05)
    sc = ts["layers.2.hc_ffn_scale"]
    assert bool(((sc >= 0.5) & (sc <= 1.5)).all())
    t2e = ts["layers.0.ffn.gate.tid2eid"]
    assert t2e.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    assert int(t2e.min()) >= 0 and int(t2e.max()) < cfg.n_routed_experts
    assert bool((t2e[:, 0] != t2e[:, 1]).all())
    # All experts get used by the hash table.
    assert set(t2e.flatten().tolist()) == set(range(cfg.n_routed_experts))


def test_weight_scale(tmp_path):
    cfg = _cfg()
    d = write_random_checkpoint(cfg, tmp_path / "ws", weight_scale=3.0, dtype=torch.float32, progress=False)
    w = load_file(d / ST)["layers.0.attn.wq_a.weight"]
    assert w.std().item() == pytest.approx(3.0 / math.sqrt(cfg.hidden_size), rel=0.05)


def test_size_guard(tmp_path):
    flash = preset("flash")
    assert checkpoint_nbytes(flash) > 100 * 2**30
    with pytest.raises(ValueError, match="refusing"):
        write_random_checkpoint(flash, tmp_path / "flash", progress=False)
    assert not (tmp_path / "flash").exists() or not any((tmp_path / "flash").iterdir())
    small = preset("flash", num_hidden_layers=1, n_routed_experts=4)
    assert checkpoint_nbytes(small) < 8 * 2**30
    with pytest.raises(ValueError, match="max_bytes"):
        write_random_checkpoint(_cfg(), tmp_path / "tiny", max_bytes=1000, progress=False)
    cfg = _cfg()
    d = write_random_checkpoint(cfg, tmp_path / "n", progress=False)
    assert sum(t.nbytes for t in _raw(d).values()) == checkpoint_nbytes(cfg)


def test_mtp_tensors_ignored(bad):
    _rewrite(bad, lambda t: t.update({"mtp.0.attn.wq_a.weight": torch.zeros(4, 4)}))
    _, ts = load_checkpoint(bad, progress=False)
    assert not any("mtp" in n for n in ts)


# ============================================================== transformers interop
def test_transformers_loads_our_checkpoint(ckpt):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    sd = model.state_dict()
    _, ts = load_checkpoint(ckpt, dtype=torch.float32, progress=False)
    pairs = {
        "model.layers.0.self_attn.q_a_proj.weight": "layers.0.attn.wq_a.weight",
        "model.layers.1.self_attn.q_b_proj.weight": "layers.1.attn.wq_b.weight",
        "model.layers.2.self_attn.o_a_proj.weight": "layers.2.attn.wo_a.weight",
        "model.layers.0.self_attn.sinks": "layers.0.attn.attn_sink",
        "model.layers.1.self_attn.compressor.position_bias": "layers.1.attn.compressor.ape",
        "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight": "layers.1.attn.indexer.wq_b.weight",
        "model.layers.1.self_attn.compressor.indexer.kv_proj.weight": "layers.1.attn.indexer.compressor.wkv.weight",
        "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight":
            "layers.1.attn.indexer.weights_proj.weight",
        "model.layers.0.attn_hc.fn": "layers.0.hc_attn_fn",
        "model.layers.3.ffn_hc.scale": "layers.3.hc_ffn_scale",
        "model.layers.0.input_layernorm.weight": "layers.0.attn_norm.weight",
        "model.embed_tokens.weight": "embed.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "head.weight",
        "model.hc_head.hc_fn": "hc_head_fn",
        "model.hc_head.hc_base": "hc_head_base",
        "model.hc_head.hc_scale": "hc_head_scale",
        "model.layers.0.mlp.gate.weight": "layers.0.ffn.gate.weight",
        "model.layers.0.mlp.gate.tid2eid": "layers.0.ffn.gate.tid2eid",
        "model.layers.1.mlp.gate.e_score_correction_bias": "layers.1.ffn.gate.bias",
        "model.layers.2.mlp.shared_experts.down_proj.weight": "layers.2.ffn.shared_experts.w2.weight",
    }
    for hf_name, name in pairs.items():
        assert torch.equal(sd[hf_name], ts[name]), (hf_name, name)
    for layer in (0, 1):
        gate_up = sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = sd[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in (0, 5, 7):
            f = f"layers.{layer}.ffn.experts.{e}."
            assert torch.equal(gate_up[e], torch.cat([ts[f + "w1.weight"], ts[f + "w3.weight"]], 0))
            assert torch.equal(down[e], ts[f + "w2.weight"])
    # The init keeps activations O(1) through the whole model.
    ids = torch.randint(0, _cfg().vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert bool(torch.isfinite(logits).all())
    assert 0.1 < logits.std().item() < 10


def test_loader_reads_transformers_save_pretrained(ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    out = tmp_path / "hf"
    model.save_pretrained(out)
    stored = _raw(out)
    assert any(k.startswith("model.layers.") for k in stored)
    assert any(canonical_name(k) != k for k in stored)
    cfg, ts = load_checkpoint(out, progress=False)
    assert cfg == _cfg()
    _, ours = load_checkpoint(ckpt, progress=False)
    assert list(ts) == list(ours)
    for name, t in ts.items():
        assert torch.equal(t, ours[name].to(t.dtype)), name
    # and the file names map one to one
    assert {canonical_name(k) for k in stored} == set(ts)


# ============================================================== malformed checkpoints
def test_missing_tensor(bad):
    _rewrite(bad, lambda t: t.pop("layers.1.attn.wq_a.weight"))
    _raises(bad, "layers.1.attn.wq_a.weight", "missing 1 of")


def test_many_missing_tensors_listed_with_count(bad):
    def drop(t):
        for k in [k for k in t if ".experts." in k]:
            del t[k]
    _rewrite(bad, drop)
    n = 4 * 8 * 3
    msg = _raises(bad, f"missing {n} of", "layers.0.ffn.experts.0.w1.weight", f"({n - 20} more)")
    assert msg.count("ffn.experts.") == 20


def test_extra_tensor(bad):
    _rewrite(bad, lambda t: t.update({"layers.0.attn.bogus.weight": torch.zeros(2, 2)}))
    _raises(bad, "unexpected", "layers.0.attn.bogus.weight")


def test_wrong_shape(bad):
    _rewrite(bad, lambda t: t.update({"layers.2.attn.wkv.weight": torch.zeros(63, 128, dtype=torch.bfloat16)}))
    _raises(bad, "layers.2.attn.wkv.weight", "[64, 128]", "[63, 128]")


def test_wrong_shape_names_stored_name(bad):
    def rename(t):
        t["model.layers.0.attn.wkv.weight"] = torch.zeros(64, 127, dtype=torch.bfloat16)
        del t["layers.0.attn.wkv.weight"]
    _rewrite(bad, rename)
    _raises(bad, "'layers.0.attn.wkv.weight'", "model.layers.0.attn.wkv.weight", "[64, 128]", "[64, 127]")


def test_duplicate_canonical_name(bad):
    _rewrite(bad, lambda t: t.update({"model.embed_tokens.weight": t["embed.weight"].clone()}))
    _raises(bad, "duplicate", "embed.weight", "model.embed_tokens.weight")


def test_float_tid2eid(bad):
    _rewrite(bad, lambda t: t.update({"layers.0.ffn.gate.tid2eid": t["layers.0.ffn.gate.tid2eid"].float()}))
    _raises(bad, "layers.0.ffn.gate.tid2eid", "integer", "F32")


@pytest.mark.parametrize("dtype,st", [(torch.int32, "I32"), (torch.float64, "F64")])
def test_bad_float_dtype(bad, dtype, st):
    name = "layers.1.attn.wo_b.weight"
    _rewrite(bad, lambda t: t.update({name: t[name].to(dtype)}))
    _raises(bad, name, st, "BF16")


def test_int32_tid2eid_accepted(bad):
    name = "layers.0.ffn.gate.tid2eid"
    _rewrite(bad, lambda t: t.update({name: t[name].to(torch.int32)}))
    _, ts = load_checkpoint(bad, progress=False)
    assert ts[name].dtype == torch.int32
    _, ts = load_checkpoint(bad, dtype=torch.float32, progress=False)
    assert ts[name].dtype == torch.int64


@pytest.mark.parametrize("value,word", [(float("nan"), "1 NaN"), (float("inf"), "1 Inf"), (float("-inf"), "1 Inf")])
def test_non_finite(bad, value, word):
    name = "layers.3.ffn.experts.2.w3.weight"

    def poison(t):
        t[name][5, 7] = value
    _rewrite(bad, poison)
    _raises(bad, name, word, "[5, 7]")
    load_checkpoint(bad, check_finite=False, progress=False)  # opt-out


def test_non_finite_fp32_tensor(bad):
    name = "layers.1.attn.compressor.ape"

    def poison(t):
        t[name][0, :3] = float("nan")
    _rewrite(bad, poison)
    _raises(bad, name, "3 NaN")


def test_tid2eid_out_of_range(bad):
    name = "layers.0.ffn.gate.tid2eid"

    def poison(t):
        t[name][17] = torch.tensor([1, 8])
    _rewrite(bad, poison)
    _raises(bad, name, "row 17", "[0, 8)", "8")


def test_tid2eid_negative(bad):
    name = "layers.0.ffn.gate.tid2eid"

    def poison(t):
        t[name][3, 0] = -1
    _rewrite(bad, poison)
    _raises(bad, name, "row 3", "-1")


def test_tid2eid_duplicate_expert(bad):
    name = "layers.0.ffn.gate.tid2eid"

    def poison(t):
        t[name][40] = torch.tensor([6, 6])
        t[name][41] = torch.tensor([2, 2])
    _rewrite(bad, poison)
    _raises(bad, name, "row 40", "distinct", "[6, 6]")


@pytest.mark.parametrize("keep", ["minus100", "half", "4", "100"])
def test_truncated_file(bad, keep):
    p = bad / ST
    data = p.read_bytes()
    n = {"minus100": len(data) - 100, "half": len(data) // 2, "4": 4, "100": 100}[keep]
    p.write_bytes(data[:n])
    msg = _raises(bad, ST)
    if keep in ("minus100", "half"):  # header intact: the cut-off tensors are named
        assert "cut off" in msg, msg
    if keep == "minus100":
        assert list(expected_tensors(_cfg()))[-1] in msg  # the writer's last tensor


def test_tensor_read_failure_names_file_and_tensor(ckpt, monkeypatch):
    """A read error that surfaces only in get_tensor (e.g. I/O error on a truncated mmap)."""
    from safetensors import SafetensorError

    import llm_kernels.checkpoint.safetensors_io as io

    real = io.safe_open
    victim = "layers.2.attn.wo_b.weight"

    class Flaky:
        def __init__(self, *a, **kw):
            self._h = real(*a, **kw)

        def __enter__(self):
            self._f = self._h.__enter__()
            return self

        def __exit__(self, *exc):
            return self._h.__exit__(*exc)

        def __getattr__(self, k):
            return getattr(self._f, k)

        def get_tensor(self, name):
            if name == victim:
                raise SafetensorError("simulated short read")
            return self._f.get_tensor(name)

    monkeypatch.setattr(io, "safe_open", Flaky)
    _raises(ckpt, victim, ST, "simulated short read")


def test_missing_shard(tmp_path):
    d = write_random_checkpoint(_cfg(), tmp_path / "sh", shard_size_bytes=300_000, progress=False)
    wmap = json.loads((d / INDEX).read_text())["weight_map"]
    victim = sorted(set(wmap.values()))[1]
    (d / victim).unlink()
    held = [k for k, v in wmap.items() if v == victim]
    _raises(d, victim, "missing", held[0])


def test_index_lists_tensor_absent_from_shard(tmp_path):
    d = write_random_checkpoint(_cfg(), tmp_path / "sh", shard_size_bytes=300_000, progress=False)
    index = json.loads((d / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["layers.0.attn.phantom.weight"] = first
    (d / INDEX).write_text(json.dumps(index))
    _raises(d, "layers.0.attn.phantom.weight", first)


def test_pickle_only_dir(ckpt, tmp_path):
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _raises(d, "pickle", "pytorch_model.bin")


def test_shards_without_index(bad):
    (bad / ST).rename(bad / "model-00001-of-00001.safetensors")
    _raises(bad, INDEX)


def test_missing_config(bad):
    (bad / "config.json").unlink()
    with pytest.raises(ConfigError):
        load_checkpoint(bad, progress=False)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "nope", progress=False)
