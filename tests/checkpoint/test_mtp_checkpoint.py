"""The multi-token-prediction block in checkpoints (DeepSeek-V4 ``mtp.{k}.*``, release naming,
spec §12.1): written by ``make-checkpoint --mtp-layers 1`` (float and release formats), read
and validated with ``load_checkpoint(..., mtp=True)``, skipped otherwise, carried along by
``quantize``; a config that announces a block its files do not hold is refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llm_kernels import cli
from llm_kernels.checkpoint import load_checkpoint
from llm_kernels.errors import CheckpointError, ConfigError
from llm_kernels.models import preset
from llm_kernels.models.deepseek_v4 import weights as W
from llm_kernels.numerics.group_quant import GroupQuantWeight
from llm_kernels.numerics.mxfp4 import MXFP4Weight
from llm_kernels.numerics.quant import QuantWeight


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtpck")
    out = {}
    for fmt in ("float", "release"):
        out[fmt] = root / fmt
        assert cli.main(["make-checkpoint", "--preset", "mini", "--mtp-layers", "1", "--dtype", "float32",
                         "--format", fmt, "--out", str(out[fmt])]) == 0
    return out


def test_mtp_table_is_an_swa_layer_plus_the_block_tensors():
    cfg = preset("mini", mtp_layers=1)
    t = W.expected_float_tensors(cfg)
    mtp = {n: i.shape for n, i in t.items() if n.startswith("mtp.0.")}
    base = {n: i.shape for n, i in W.expected_float_tensors(preset("mini")).items()}
    D, HC = cfg.hidden_size, cfg.hc_mult
    swa_layer = {n[len("layers.0."):]: s for n, s in base.items() if n.startswith("layers.0.")}
    swa_layer = {k: v for k, v in swa_layer.items() if k != "ffn.gate.tid2eid"}  # layer 0 is hash-routed
    swa_layer["ffn.gate.bias"] = (cfg.n_routed_experts,)                         # the MTP block is not
    extra = {"e_proj.weight": (D, D), "h_proj.weight": (D, D), "enorm.weight": (D,), "hnorm.weight": (D,),
             "norm.weight": (D,), "hc_head_fn": (HC, HC * D), "hc_head_base": (HC,), "hc_head_scale": (1,)}
    assert {n[len("mtp.0."):]: s for n, s in mtp.items()} == {**swa_layer, **extra}
    assert cfg.layer_type(cfg.mtp_layer(0)) == "sliding_attention" and not cfg.is_hash_layer(cfg.mtp_layer(0))
    assert W.is_fp32_tensor("mtp.0.enorm.weight") and W.is_fp32_tensor("mtp.0.hnorm.weight")
    assert W.is_w8a8_weight("mtp.0.e_proj.weight") and W.is_w8a8_weight("mtp.0.ffn.experts.3.w2.weight")
    assert W.release_format("mtp.0.h_proj.weight") == "fp8" and W.release_format("mtp.0.ffn.experts.0.w1.weight") == "mxfp4"
    assert W.is_ignored("mtp.0.e_proj.weight", preset("mini")) and not W.is_ignored("mtp.0.e_proj.weight", cfg)
    with pytest.raises(IndexError):
        preset("mini").mtp_layer(0)
    with pytest.raises(ConfigError, match="--mtp-layers does not apply"):
        preset("qwen3-mini", mtp_layers=1)


def test_float_roundtrip_and_skip(ckpts):
    ck = ckpts["float"]
    assert json.loads((ck / "config.json").read_text())["num_nextn_predict_layers"] == 1
    cfg0, w0 = load_checkpoint(ck, progress=False)
    assert cfg0.num_nextn_predict_layers == 0 and not any(n.startswith("mtp.") for n in w0)
    cfg, w = load_checkpoint(ck, progress=False, mtp=True)
    names = [n for n in w if n.startswith("mtp.0.")]
    assert cfg.num_nextn_predict_layers == 1 and len(names) == len(
        [n for n in W.expected_float_tensors(cfg) if n.startswith("mtp.0.")])
    with safe_open(str(ck / "model.safetensors"), framework="pt") as f:  # float32 storage: exact
        for n in names:
            assert torch.equal(w[n], f.get_tensor(n)), n
    for n in names:
        assert torch.equal(w[n], w0.get(n, w[n]))


@pytest.mark.parametrize("quant,kind", [("int8", QuantWeight), ("w8a8", QuantWeight), ("int8_g32", GroupQuantWeight)])
def test_quantized_loads_include_the_block(ckpts, quant, kind):
    _, w = load_checkpoint(ckpts["float"], dtype=torch.bfloat16, progress=False, quant=quant, mtp=True)
    assert isinstance(w["mtp.0.e_proj.weight"], kind) and isinstance(w["mtp.0.ffn.experts.1.w3.weight"], kind)


def test_release_format_block(ckpts, tmp_path):
    ck = ckpts["release"]
    with safe_open(str(ck / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert str(f.get_slice("mtp.0.e_proj.weight").get_dtype()) == "F8_E4M3"
    assert {"mtp.0.e_proj.scale", "mtp.0.attn.wkv.scale", "mtp.0.ffn.experts.0.w1.scale"} <= keys
    _, w = load_checkpoint(ck, dtype=torch.bfloat16, progress=False, mtp=True)
    assert isinstance(w["mtp.0.e_proj.weight"], GroupQuantWeight)
    assert isinstance(w["mtp.0.ffn.experts.0.w1.weight"], MXFP4Weight)
    _, deq = load_checkpoint(ck, dtype=torch.float32, progress=False, quant="none", mtp=True)
    _, flt = load_checkpoint(ckpts["float"], dtype=torch.float32, progress=False, mtp=True)
    # FP8 block encoding: the dequantised block is within e4m3's half-ulp (2^-4 relative) of the float one
    a, b = deq["mtp.0.h_proj.weight"], flt["mtp.0.h_proj.weight"]
    assert ((a - b).abs() <= b.abs() * 2 ** -4 + 1e-6).all()


def test_quantize_carries_the_block_along(ckpts, tmp_path):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--checkpoint", str(ckpts["float"]), "--scheme", "int8", "--out", str(out)]) == 0
    cfg, w = load_checkpoint(out, progress=False, mtp=True)
    assert cfg.num_nextn_predict_layers == 1 and isinstance(w["mtp.0.h_proj.weight"], QuantWeight)


def test_config_announcing_a_missing_block(tmp_path):
    """transformers' save_pretrained keeps num_nextn_predict_layers = 1 but drops mtp.*: the
    plain load and quantize work; asking for the block is a clear error."""
    ck = tmp_path / "m"
    assert cli.main(["make-checkpoint", "--preset", "mini", "--out", str(ck)]) == 0
    conf = json.loads((ck / "config.json").read_text())
    conf["num_nextn_predict_layers"] = 1
    (ck / "config.json").write_text(json.dumps(conf))
    cfg, _ = load_checkpoint(ck, progress=False)
    assert cfg.num_nextn_predict_layers == 0
    with pytest.raises(CheckpointError, match="holds? no mtp"):
        load_checkpoint(ck, progress=False, mtp=True)
    assert cli.main(["quantize", "--checkpoint", str(ck), "--out", str(tmp_path / "q")]) == 0
    load_checkpoint(tmp_path / "q", progress=False)
