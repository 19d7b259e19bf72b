"""config.json fields of the wrong JSON type, for both models: every one raises
:class:`ConfigError` naming the field (and, through ``load_config``/``from_json``, the
file), never a bare ``TypeError``/``ValueError``/``KeyError``/``AttributeError``.

The parametrised test feeds several wrong types to every field the readers use; the
hypothesis test puts random JSON values into random fields (top level and rope
sub-dicts) and accepts only a config or a ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest

from llm_kernels import models
from llm_kernels.errors import ConfigError
from llm_kernels.models import preset
from llm_kernels.models.deepseek_v4.config import DeepSeekV4Config
from llm_kernels.models.qwen3.config import Qwen3Config
from llm_kernels.numerics.rope import RopeParameters


def _qwen3_yarn() -> dict:
    return preset("qwen3-mini").replace(rope=RopeParameters(
        "yarn", 1e6, factor=4.0, original_max_position_embeddings=1024, attention_factor=1.1)).to_hf_dict()


BASES = {"deepseek_v4": lambda: preset("mini").to_hf_dict(), "qwen3": _qwen3_yarn}
CLASSES = {"deepseek_v4": DeepSeekV4Config, "qwen3": Qwen3Config}

# wrong values per expected JSON type ("number" = int or float)
BAD = {
    "int": ["4096", 64.0, True, [1], {"n": 1}],
    "number": ["1e-6", True, [1.0], {"x": 1.0}],
    "bool": [1, "true", 0.0, [True]],
    "str": [1, True, ["silu"], {"a": "b"}],
    "object": ["yarn", [1, 2], 1, True],
    "list[str]": ["sliding_attention", {"a": 1}, 1, [1, 2]],
    "list[int]": ["0,4", {"a": 1}, [0.0, 4.0], [True, 4]],
}
_ANN = {"int": "int", "float": "number", "bool": "bool", "str": "str", "int | None": "int"}


def _fields(model: str) -> dict[str, str]:
    """field path -> expected JSON type, for every field the reader uses."""
    out = {f.name: _ANN[f.type] for f in dataclasses.fields(CLASSES[model]) if f.type in _ANN}
    out["model_type"] = "str"
    out["quantization_config"] = "object"
    if model == "deepseek_v4":
        out.update({
            "num_key_value_heads": "int", "hidden_act": "str", "attention_bias": "bool", "mlp_bias": "bool",
            "partial_rotary_factor": "number", "qk_rope_head_dim": "int", "rope_theta": "number",
            "compress_rope_theta": "number", "compress_rate_csa": "int", "compress_rate_hca": "int",
            "num_hash_layers": "int", "layer_types": "list[str]", "mlp_layer_types": "list[str]",
            "compress_ratios": "list[int]", "compress_rates": "object", "rope_parameters": "object",
            "rope_scaling": "object", "compress_rates.compressed_sparse_attention": "int",
        })
        for label in ("main", "compress"):
            out[f"rope_parameters.{label}"] = "object"
            out[f"rope_parameters.{label}.rope_theta"] = "number"
            out[f"rope_parameters.{label}.rope_type"] = "str"
            out[f"rope_parameters.{label}.partial_rotary_factor"] = "number"
        for k, t in (("factor", "number"), ("original_max_position_embeddings", "int"), ("beta_fast", "number"),
                     ("beta_slow", "number"), ("attention_factor", "number"), ("mscale", "number"),
                     ("truncate", "bool")):
            out[f"rope_parameters.compress.{k}"] = t
    else:
        out.update({
            "hidden_act": "str", "attention_bias": "bool", "use_sliding_window": "bool", "sliding_window": "int",
            "max_window_layers": "int", "layer_types": "list[str]", "rope_theta": "number",
            "rope_parameters": "object", "rope_scaling": "object",
        })
        for k, t in (("rope_theta", "number"), ("rope_type", "str"), ("factor", "number"),
                     ("original_max_position_embeddings", "int"), ("beta_fast", "number"),
                     ("attention_factor", "number"), ("partial_rotary_factor", "number"), ("truncate", "bool")):
            out[f"rope_parameters.{k}"] = t
    out.pop("eos_token_id", None)  # int | list[int] | null: covered by test_token_ids
    out.pop("bos_token_id", None)
    return out


def _set(d: dict, path: str, value) -> dict:
    d = json.loads(json.dumps(d))
    *parents, last = path.split(".")
    node = d
    for k in parents:
        node = node[k]
    node[last] = value
    return d


CASES = [pytest.param(model, path, bad, id=f"{model}-{path}-{type(bad).__name__}{i}")
         for model in BASES for path, t in _fields(model).items() for i, bad in enumerate(BAD[t])]


@pytest.mark.parametrize("model, path, bad", CASES)
def test_wrong_type_raises_config_error_naming_field(model, path, bad):
    d = _set(BASES[model](), path, bad)
    if path == "rope_scaling" or path == "rope_parameters" and model == "qwen3":
        d.pop("rope_parameters" if path == "rope_scaling" else "rope_scaling", None)
    leaf = path.split(".")[-1]
    with pytest.raises(ConfigError) as ei:
        CLASSES[model].from_hf_dict(d)
    assert leaf in str(ei.value), str(ei.value)
    got = {type(bad).__name__} | ({type(x).__name__ for x in bad} if isinstance(bad, list) else set())
    assert any(f"got {t} " in str(ei.value) for t in got), str(ei.value)


def test_message_names_file_and_field(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(dict(preset("flash").to_hf_dict(), hidden_size="4096")))
    for load in (models.load_config, DeepSeekV4Config.from_json):
        with pytest.raises(ConfigError) as ei:
            load(tmp_path)
        assert str(ei.value) == f"{p}: field 'hidden_size' must be an integer, got str '4096'"
    p.write_text(json.dumps(dict(preset("qwen3-mini").to_hf_dict(), rope_parameters="yarn")))
    with pytest.raises(ConfigError, match=r"config\.json: field 'rope_parameters' must be an object, got str"):
        models.load_config(p)
    with pytest.raises(ConfigError, match="config.json: field 'rope_parameters'"):
        Qwen3Config.from_json(p)


@pytest.mark.parametrize("text", ["[1, 2]", "\"hello\"", "42", "null", "true"])
def test_config_json_not_an_object(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    for load in (models.load_config, DeepSeekV4Config.from_json, Qwen3Config.from_json):
        with pytest.raises(ConfigError, match="config.json must be a JSON object"):
            load(tmp_path)


@pytest.mark.parametrize("model", list(BASES))
def test_token_ids(model):
    base = BASES[model]()
    c = CLASSES[model].from_hf_dict(dict(base, eos_token_id=[7, 8], bos_token_id=None))
    assert (c.eos_token_id, c.bos_token_id) == (7, None)
    for bad in ("7", 7.0, True, [7, "8"], {"id": 7}):
        with pytest.raises(ConfigError, match="eos_token_id"):
            CLASSES[model].from_hf_dict(dict(base, eos_token_id=bad))


@pytest.mark.parametrize("model", list(BASES))
def test_null_required_field(model):
    with pytest.raises(ConfigError, match="field 'hidden_size' must be an integer, got NoneType None"):
        CLASSES[model].from_hf_dict(dict(BASES[model](), hidden_size=None))


# ------------------------------------------------------------------ property test
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 200_000) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from(["yarn", "default", "silu", "sliding_attention", "moe"]),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


# CFG_HYP_EXAMPLES=5000 for a longer, randomised run (default: 400 examples, derandomised)
@hypothesis.settings(max_examples=int(os.environ.get("CFG_HYP_EXAMPLES", "400")), deadline=None,
                     derandomize="CFG_HYP_EXAMPLES" not in os.environ, database=None)
@hypothesis.given(model=st.sampled_from(list(BASES)), data=st.data())
def test_random_values_give_config_or_config_error(model, data):
    fields = sorted(_fields(model))
    paths = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True))
    d = BASES[model]()
    for path in paths:
        try:
            d = _set(d, path, data.draw(_json))
        except (KeyError, TypeError):  # a parent was replaced by a non-object earlier
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            CLASSES[model].from_hf_dict(d)
        except ConfigError:
            pass


def test_unknown_rope_keys_warn_like_transformers():
    """transformers ignores unrecognized ``rope_parameters`` keys with a warning; so do we
    (the profile read is the same)."""
    d = preset("mini").to_hf_dict()
    d["rope_parameters"]["compress"]["low_freq_factor"] = 1.0
    with pytest.warns(UserWarning, match=r"rope_parameters\.compress.*\['low_freq_factor'\]"):
        assert DeepSeekV4Config.from_hf_dict(d) == preset("mini")
    q = dict(preset("qwen3-mini").to_hf_dict(), rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                 "factor": 4.0})
    with pytest.warns(UserWarning, match=r"\['factor'\]"):
        assert Qwen3Config.from_hf_dict(q) == preset("qwen3-mini")
