"""DeepSeekV4Config: HF config.json parsing (modern + legacy fields), errors, presets."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from llm_kernels.models.deepseek_v4.config import CSA, HCA, SLIDING, DeepSeekV4Config
from llm_kernels.errors import ConfigError
from llm_kernels.models import preset

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["mini", "flash", "pro"])
def test_round_trip_through_transformers(name):
    cfg = preset(name)
    hf = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    back = DeepSeekV4Config.from_hf_dict(json.loads(hf.to_json_string()))
    assert back == cfg
    assert hf.layer_types == list(cfg.layer_types) and hf.mlp_layer_types == list(cfg.mlp_layer_types)
    assert hf.qk_rope_head_dim == cfg.qk_rope_head_dim


def test_legacy_fields_fold_like_transformers():
    legacy = {
        "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "head_dim": 32, "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 16, "moe_intermediate_size": 32,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "index_n_heads": 4, "index_head_dim": 32,
        "compress_ratios": [0, 4, 128, 4, 0],  # 4 layers + the MTP layer
        "num_hash_layers": 2, "qk_rope_head_dim": 16, "compress_rope_theta": 40000.0,
        "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 32768,
    }
    ours = DeepSeekV4Config.from_hf_dict(legacy)
    theirs = transformers.DeepseekV4Config(**legacy)
    assert list(ours.layer_types) == theirs.layer_types == [SLIDING, CSA, HCA, CSA]
    assert list(ours.mlp_layer_types) == theirs.mlp_layer_types == ["hash_moe"] * 2 + ["moe"] * 2
    assert ours.qk_rope_head_dim == theirs.qk_rope_head_dim == 16
    comp = theirs.rope_parameters["compress"]
    assert ours.rope_compress.rope_type == comp["rope_type"] == "yarn"
    assert ours.rope_compress.factor == comp["factor"] and ours.rope_compress.rope_theta == comp["rope_theta"]
    assert ours.rope_compress.attention_factor == comp["attention_factor"] == 1.0
    assert ours.rope_main.rope_type == "default" and ours.rope_main.rope_theta == 10000.0


def test_rope_tables_match_transformers_yarn():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    from llm_kernels.reference.deepseek_v4.common import rope_cos_sin

    cfg = preset("flash")
    hf = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    rot = DeepseekV4RotaryEmbedding(hf)
    pos = torch.tensor([[0, 1, 5, 127, 128, 4096, 65535, 300000]])
    for label, rp in (("main", cfg.rope_main), ("compress", cfg.rope_compress)):
        c_ref, s_ref = rot(torch.zeros(1, dtype=torch.float32), pos, layer_type=label)
        c, s = rope_cos_sin(rp, cfg.qk_rope_head_dim, pos[0], torch.float32)
        assert torch.equal(c, c_ref[0]) and torch.equal(s, s_ref[0]), label


@pytest.mark.parametrize("change, needle", [
    ({"layer_types": ["sliding_attention"] * 3}, "len(layer_types)"),
    ({"layer_types": ["full_attention"] * 4}, "layer_types entries"),
    ({"mlp_layer_types": ["dense"] * 4}, "mlp_layer_types entries"),
    ({"num_attention_heads": 5}, "o_groups"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"model_type": "qwen3"}, "model_type"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"compress_rates": {"compressed_sparse_attention": 0, "heavily_compressed_attention": 128}},
     "compress_rates"),
    ({"rope_parameters": {"main": {"rope_type": "default", "rope_theta": 1e4},
                          "compress": {"rope_type": "longrope", "rope_theta": 1e4}}}, "not supported"),
])
def test_inconsistent_config_raises(change, needle):
    d = preset("mini").to_hf_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=None) as ei:
        DeepSeekV4Config.from_hf_dict(d)
    assert needle in str(ei.value)


def test_unknown_keys_warn_and_are_ignored():
    """Like transformers, keys this reader does not know (a newer transformers field, a
    checkpoint's own notes) are kept out of the config with a warning naming them."""
    d = preset("mini").to_hf_dict()
    d.update(some_new_field=1, _notes={"by": "me"})
    with pytest.warns(UserWarning, match=r"unknown DeepSeek-V4 config keys \['_notes', 'some_new_field'\]"):
        assert DeepSeekV4Config.from_hf_dict(d) == preset("mini")
    # keys real checkpoints carry are known and do not warn
    d = dict(preset("mini").to_hf_dict(), torch_dtype="bfloat16", transformers_version="5.25.0",
             auto_map={"AutoConfig": "x.Y"}, architectures=["DeepseekV4ForCausalLM"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DeepSeekV4Config.from_hf_dict(d) == preset("mini")


def test_missing_field_and_file(tmp_path):
    d = preset("mini").to_hf_dict()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        DeepSeekV4Config.from_hf_dict(d)
    with pytest.raises(ConfigError, match="config.json"):
        DeepSeekV4Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        DeepSeekV4Config.from_json(tmp_path)


def test_presets_have_real_dimensions():
    fl, pro, mini = preset("flash"), preset("pro"), preset("mini")
    assert (fl.hidden_size, fl.num_hidden_layers, fl.n_routed_experts, fl.index_topk) == (4096, 43, 256, 512)
    assert (pro.hidden_size, pro.num_hidden_layers, pro.n_routed_experts, pro.index_topk) == (7168, 61, 384, 1024)
    assert fl.layer_types[:4] == (SLIDING, SLIDING, CSA, HCA) and fl.layer_types.count(CSA) == 21
    assert pro.layer_types[:3] == (HCA, HCA, CSA) and pro.layer_types.count(HCA) == 31
    assert fl.rope_compress.factor == 16 and fl.rope_compress.original_max_position_embeddings == 65536
    assert fl.softmax_scale == pytest.approx(512 ** -0.5) and fl.mix_hc == 24
    # mini exercises every mechanism
    assert {SLIDING, CSA, HCA} <= set(mini.layer_types) and "hash_moe" in mini.mlp_layer_types
    assert dict(mini.compress_rates) == {CSA: 4, HCA: 128} and mini.sliding_window == 128
    assert mini.num_experts_per_tok > 1 and mini.hc_mult == 4
    small = preset("flash", num_hidden_layers=5, n_routed_experts=4)
    assert small.num_hidden_layers == 5 and small.num_experts_per_tok == 4
    with pytest.raises(ConfigError):
        preset("huge")
