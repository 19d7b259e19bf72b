"""Qwen3Config: HF config.json parsing (modern and legacy rope fields), presets, errors."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from llm_kernels.errors import ConfigError
from llm_kernels.models.deepseek_v4.config import DeepSeekV4Config
from llm_kernels.models.qwen3.config import Qwen3Config
from llm_kernels.models import load_config, preset

# Qwen3-32B's release config.json (transformers 4.x layout: top-level rope_theta, rope_scaling null)
QWEN3_32B_RELEASE = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 25600,
    "max_position_embeddings": 40960, "max_window_layers": 64, "model_type": "qwen3",
    "num_attention_heads": 64, "num_hidden_layers": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def test_release_config_equals_preset():
    assert Qwen3Config.from_hf_dict(QWEN3_32B_RELEASE) == preset("qwen3-32b")
    c = preset("qwen3-32b")
    assert (c.num_key_value_groups, c.q_size, c.kv_size) == (8, 8192, 1024)
    assert c.softmax_scale == 128 ** -0.5


def test_roundtrip_through_transformers(tmp_path):
    """to_hf_dict -> transformers.Qwen3Config -> its to_dict -> from_hf_dict is the identity."""
    import transformers

    for cfg in (preset("qwen3-mini"), preset("qwen3-32b", num_hidden_layers=2)):
        hf = transformers.Qwen3Config(**cfg.to_hf_dict())
        assert Qwen3Config.from_hf_dict(hf.to_dict()) == cfg
        assert hf.head_dim == cfg.head_dim and hf.num_key_value_heads == cfg.num_key_value_heads


def test_yarn_attention_factor_inferred_like_transformers():
    d = dict(QWEN3_32B_RELEASE, max_position_embeddings=131072,
             rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    c = Qwen3Config.from_hf_dict(d)
    assert c.rope.rope_type == "yarn" and c.rope.factor == 4.0 and c.rope.rope_theta == 1e6
    assert c.rope.attention_factor == pytest.approx(0.1 * math.log(4.0) + 1.0)
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llm_kernels.numerics.rope import rope_inv_freq

    hf = transformers.Qwen3Config(**c.to_hf_dict())
    inv, af = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    assert af == pytest.approx(c.rope.attention_factor)
    assert torch.allclose(inv.float(), rope_inv_freq(c.rope, 128), rtol=1e-6, atol=0)


@pytest.mark.parametrize("change, match", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 7}, "divisible"),
    ({"head_dim": 127}, "head_dim must be even"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "yarn"}, "max_position_embeddings": 0}, "max_position_embeddings"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"layer_types": ["sliding_attention"] * 64}, "full_attention"),
])
def test_bad_configs_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        Qwen3Config.from_hf_dict(dict(QWEN3_32B_RELEASE, **change))


def test_unknown_keys_warn_and_are_ignored():
    with pytest.warns(UserWarning, match=r"unknown Qwen3 config keys \['frobnicate'\]"):
        assert Qwen3Config.from_hf_dict(dict(QWEN3_32B_RELEASE, frobnicate=1)) == preset("qwen3-32b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Qwen3Config.from_hf_dict(dict(QWEN3_32B_RELEASE, auto_map={"AutoModel": "m.M"}))


def test_yarn_without_original_max_position_embeddings_like_transformers():
    """transformers' ``standardize_rope_params`` fills ``original_max_position_embeddings``
    with ``max_position_embeddings``; we read the same profile."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = dict(QWEN3_32B_RELEASE, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    c = Qwen3Config.from_hf_dict(d)
    assert c.rope.original_max_position_embeddings == 40960 and c.rope.factor == 2.0
    hf = transformers.Qwen3Config(**d)
    _, af = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    assert hf.rope_parameters["original_max_position_embeddings"] == 40960
    assert c.rope.attention_factor == pytest.approx(af)


def test_missing_field_and_head_dim_default():
    d = dict(QWEN3_32B_RELEASE)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        Qwen3Config.from_hf_dict(d)
    d = dict(QWEN3_32B_RELEASE)
    del d["head_dim"]
    assert Qwen3Config.from_hf_dict(d).head_dim == 5120 // 64


def test_load_config_dispatches_on_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_32B_RELEASE))
    assert isinstance(load_config(tmp_path), Qwen3Config)
    (tmp_path / "config.json").write_text(json.dumps(preset("mini").to_hf_dict()))
    assert isinstance(load_config(tmp_path), DeepSeekV4Config)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        load_config(tmp_path)


def test_presets():
    assert preset("qwen3-32b", num_hidden_layers=1).num_hidden_layers == 1
    with pytest.raises(ConfigError, match="dense model"):
        preset("qwen3-mini", n_routed_experts=4)
    with pytest.raises(ConfigError, match="qwen3-mini"):
        preset("qwen3-7b")
