"""Every way a DeepSeek-V4 ``config.json`` can spell its RoPE profiles is read the way
transformers reads that same file: whole-prompt fp32 logits of our reference
``model.forward`` vs ``DeepseekV4ForCausalLM.from_pretrained(dir)`` on one random
checkpoint (``mini``: SWA, CSA and HCA layers) whose ``config.json`` is rewritten per form.

The forms and the YaRN ``attention_factor`` (cos/sin scale) transformers applies:

* legacy flat ``rope_scaling`` (or a flat ``rope_parameters``) without ``attention_factor``:
  ``DeepseekV4Config`` injects 1.0 for the compress profile (DeepSeek's reference);
* ``rope_parameters`` with ``main``/``compress`` sub-dicts, no ``attention_factor``: YaRN's
  default ``0.1·ln(factor) + 1`` (1.277 at factor 16), or
  ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`` when both are given
  -- for the ``main`` profile too;
* an explicit ``attention_factor``: as given.

A sub-dict without ``rope_theta`` takes the top-level ``rope_theta`` (transformers'
``standardize_rope_params``), not ``compress_rope_theta``.

Before this was fixed our loader assumed 1.0 for the nested form without the field: the
logits differed from transformers by ~0.3 from position 0 on (printed by the test).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import assert_close_fp32, hf_logits, max_abs, token_ids

from llm_kernels.checkpoint import load_checkpoint, write_random_checkpoint
from llm_kernels.models import preset
from llm_kernels.models.deepseek_v4.config import SLIDING
from llm_kernels.reference.deepseek_v4 import model

transformers = pytest.importorskip("transformers")

T = 200  # > 128: the HCA layer emits a compressed entry
_Y = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64, "beta_fast": 32,
      "beta_slow": 1}
_MAIN = {"rope_type": "default", "rope_theta": 10000.0}
DEFAULT_AF = 0.1 * math.log(16.0) + 1.0  # 1.2773

# name -> (rope fields of config.json, expected compress attention_factor, expected main one)
FORMS = {
    "legacy_rope_scaling": ({"rope_scaling": dict(_Y)}, 1.0, 1.0),
    "legacy_rope_scaling_mscale": ({"rope_scaling": dict(_Y, mscale=1.0, mscale_all_dim=0.707)}, 1.0, 1.0),
    "flat_rope_parameters": ({"rope_parameters": dict(_Y)}, 1.0, 1.0),
    "nested_no_attention_factor": (
        {"rope_parameters": {"main": dict(_MAIN), "compress": dict(_Y, rope_theta=160000.0)}}, DEFAULT_AF, 1.0),
    "nested_explicit_1": (
        {"rope_parameters": {"main": dict(_MAIN), "compress": dict(_Y, rope_theta=160000.0, attention_factor=1.0)}},
        1.0, 1.0),
    "nested_explicit_1.1": (
        {"rope_parameters": {"main": dict(_MAIN), "compress": dict(_Y, rope_theta=160000.0, attention_factor=1.1)}},
        1.1, 1.0),
    "nested_mscale": (
        {"rope_parameters": {"main": dict(_MAIN),
                             "compress": dict(_Y, rope_theta=160000.0, mscale=1.0, mscale_all_dim=0.707)}},
        (0.1 * math.log(16) + 1) / (0.1 * 0.707 * math.log(16) + 1), 1.0),
    "nested_main_yarn": (
        {"rope_parameters": {"main": dict(_Y, factor=4.0, rope_theta=10000.0),
                             "compress": dict(_Y, rope_theta=160000.0)}}, DEFAULT_AF, 0.1 * math.log(4) + 1),
    "nested_no_theta": ({"rope_parameters": {"main": {"rope_type": "default"}, "compress": dict(_Y)}},
                        DEFAULT_AF, 1.0),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rope_forms_base")
    write_random_checkpoint(preset("mini"), d, seed=5, dtype=torch.float32, progress=False)
    return d


def _form_dir(base, tmp_path, fields: dict):
    conf = json.loads((base / "config.json").read_text())
    for k in ("rope_parameters", "rope_scaling"):  # partial_rotary_factor stays (sub-dicts inherit it)
        conf.pop(k, None)
    conf.update(json.loads(json.dumps(fields)))
    (tmp_path / "config.json").write_text(json.dumps(conf))
    os.symlink(base / "model.safetensors", tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("form", list(FORMS))
def test_rope_form_matches_transformers(base_dir, tmp_path, form):
    fields, af_compress, af_main = FORMS[form]
    d = _form_dir(base_dir, tmp_path, fields)
    cfg, w = load_checkpoint(d, dtype=torch.float32, progress=False)
    assert cfg.rope_compress.attention_factor == pytest.approx(af_compress, rel=1e-12)
    assert cfg.rope_main.attention_factor == pytest.approx(af_main, rel=1e-12)
    m = transformers.DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    rot = m.model.rotary_emb
    assert rot.compress_attention_scaling == pytest.approx(af_compress, rel=1e-12)
    assert rot.main_attention_scaling == pytest.approx(af_main, rel=1e-12)
    for label, rp in (("main", cfg.rope_main), ("compress", cfg.rope_compress)):
        theirs = m.config.rope_parameters[label]
        assert rp.rope_theta == theirs["rope_theta"], label

    ids = token_ids(cfg, T, seed=11)
    ref = hf_logits(m, ids)
    ours = model.forward(w, cfg, ids, dtype=torch.float32)
    err = assert_close_fp32(ours, ref, f"{form} fp32 forward")
    # the same weights read with attention_factor 1.0 (what the loader assumed for an absent field)
    old = cfg.replace(rope_compress=_with_af(cfg.rope_compress, 1.0), rope_main=_with_af(cfg.rope_main, 1.0))
    err_old = max_abs(model.forward(w, old, ids, dtype=torch.float32), ref)
    first_compress = next(i for i, t in enumerate(cfg.layer_types) if t != SLIDING)
    print(f"{form}: max abs vs transformers {err:.3g} (read with attention_factor 1.0: {err_old:.3g}); "
          f"compress af {cfg.rope_compress.attention_factor:.4f}, first CSA/HCA layer {first_compress}")
    if af_compress != 1.0 or af_main != 1.0:
        assert err_old > 1e-2  # the form matters: reading it as 1.0 is a visible defect


def _with_af(rp, af):
    import dataclasses

    return dataclasses.replace(rp, attention_factor=af) if rp.rope_type == "yarn" else rp


def test_writer_round_trips_attention_factor(tmp_path):
    """``to_hf_dict`` writes every YaRN field, ``attention_factor`` included, so a config we
    write is read back identically by us and by transformers."""
    cfg = preset("mini")
    for af in (1.0, DEFAULT_AF, 1.1):
        c = cfg.replace(rope_compress=_with_af(cfg.rope_compress, af))
        d = c.to_hf_dict()
        assert d["rope_parameters"]["compress"]["attention_factor"] == af
        from llm_kernels.models.deepseek_v4.config import DeepSeekV4Config
        hf = transformers.DeepseekV4Config(**json.loads(json.dumps(d)))
        assert DeepSeekV4Config.from_hf_dict(json.loads(hf.to_json_string())) == c


# ------------------------------------------------------------------ Qwen3
# Qwen3 reads a YaRN profile the same way (no model-specific injection): attention_factor
# absent -> 0.1·ln(factor) + 1 (or the mscale ratio), original_max_position_embeddings
# absent -> max_position_embeddings. Checked on the flat rope_parameters / legacy
# rope_scaling (+ top-level rope_theta) forms against Qwen3ForCausalLM.
_QY = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
Q3_FORMS = {
    "rope_scaling_no_attention_factor": ({"rope_scaling": dict(_QY), "rope_theta": 1e6}, 0.1 * math.log(4) + 1),
    "rope_parameters_no_attention_factor": ({"rope_parameters": dict(_QY, rope_theta=1e6)}, 0.1 * math.log(4) + 1),
    "rope_parameters_explicit": ({"rope_parameters": dict(_QY, rope_theta=1e6, attention_factor=1.0)}, 1.0),
    "rope_parameters_mscale": ({"rope_parameters": dict(_QY, rope_theta=1e6, mscale=1.0, mscale_all_dim=0.5)},
                               (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1)),
    "rope_scaling_no_original": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_theta": 1e4},
                                 0.1 * math.log(4) + 1),
}


@pytest.fixture(scope="module")
def q3_base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3_rope_forms_base")
    cfg = preset("qwen3-mini").replace(num_hidden_layers=2, max_position_embeddings=256)
    write_random_checkpoint(cfg, d, seed=6, dtype=torch.float32, progress=False)
    return d


@pytest.mark.parametrize("form", list(Q3_FORMS))
def test_qwen3_rope_form_matches_transformers(q3_base_dir, tmp_path, form):
    from llm_kernels.reference.qwen3 import model as q3_model

    fields, af = Q3_FORMS[form]
    d = _form_dir(q3_base_dir, tmp_path, fields)
    cfg, w = load_checkpoint(d, dtype=torch.float32, progress=False)
    assert cfg.rope.attention_factor == pytest.approx(af, rel=1e-12)
    m = transformers.Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    assert m.model.rotary_emb.attention_scaling == pytest.approx(af, rel=1e-12)
    ids = token_ids(cfg, 160, seed=12)
    ref = hf_logits(m, ids)
    err = assert_close_fp32(q3_model.forward(w, cfg, ids, torch.float32), ref, f"qwen3 {form}")
    print(f"qwen3 {form}: max abs vs transformers {err:.3g}; attention_factor {cfg.rope.attention_factor:.4f}")
