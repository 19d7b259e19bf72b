"""The model zoo of the transformers-conformance tests: every small random test config of
every model, keyed ``(model_type, case name)``, and :class:`ModelZoo`, which writes each
case's checkpoint once per session (float32 storage) and caches our loaded weights and the
transformers models.

Fixtures (``tests/conftest.py``): ``model_zoo`` (the session's :class:`ModelZoo`),
``zoo_case`` (parametrised over every case of every model: a :class:`ZooCase`), and the
per-model views ``zoo`` (DeepSeek-V4) / ``qwen3_zoo`` (Qwen3) with the older
``case(name)`` / ``checkpoint(name)`` / ``ours(name, dtype)`` / ``hf(name, dtype, ...)`` API.

Checkpoints are stored in float32, so the float32 loads are exact and both sides make the
same bf16 cast for the bfloat16 loads.

DeepSeek-V4 cases: ``mini`` (the preset), ``wide`` (other dims everywhere, own YaRN),
``scaled`` (mini with ``weight_scale=2``), ``swa32`` (sliding window 32, CSA first) and the
``*_topk_all`` long-run variants. Qwen3 cases:

* ``mini``: the ``qwen3-mini`` preset (GQA 8:2, head_dim 64 != hidden/heads, untied).
* ``tied_mha``: tied embeddings, MHA (kv heads = q heads), rope_theta 1e4.
* ``yarn_mqa``: MQA (1 kv head), YaRN factor 4 over 128 original positions (the prompts run
  past 128), attention_factor 0.1 ln 4 + 1.
* ``scaled``: mini written with ``weight_scale=2`` (larger activations).
* ``odd``: hidden 72, head_dim 40, 6:3 heads, intermediate 100: nothing a multiple of 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_kernels.models import preset
from llm_kernels.models.deepseek_v4.config import CSA, HCA, SLIDING, DeepSeekV4Config
from llm_kernels.models.qwen3.config import Qwen3Config
from llm_kernels.numerics.rope import RopeParameters

__all__ = [
    "ALL_CASE_IDS",
    "CASES",
    "CASE_NAMES",
    "HF_CLASSES",
    "Q3_CASES",
    "Q3_CASE_NAMES",
    "ZOO_CASES",
    "Case",
    "ModelZoo",
    "ModelZooView",
    "ZooCase",
]


@dataclass(frozen=True)
class Case:
    """One conformance config: the model config, the checkpoint seed and weight scale."""

    name: str
    cfg: Any
    seed: int
    weight_scale: float = 1.0


# ---------------------------------------------------------------------------- DeepSeek-V4
def _ds_mini() -> DeepSeekV4Config:
    return preset("mini")


def _ds_wide() -> DeepSeekV4Config:
    """Different dims from ``mini`` everywhere: D 96, 6 heads of 32 (rope 8), 3 output
    groups, q_lora 48, 16 indexer heads of 16 with top-8 (binding: a CSA layer has 75
    entries at 300 tokens), 6 experts top-3 with sigmoid scoring, two hash layers, HCA
    first, hc_mult 3, non-default RoPE thetas and its own YaRN profile."""
    return preset("mini").replace(
        vocab_size=384, hidden_size=96, num_hidden_layers=4, num_attention_heads=6, head_dim=32,
        qk_rope_head_dim=8, o_groups=3, o_lora_rank=24, q_lora_rank=48, moe_intermediate_size=48,
        n_routed_experts=6, num_experts_per_tok=3, scoring_func="sigmoid",
        layer_types=(HCA, CSA, SLIDING, CSA), mlp_layer_types=("hash_moe", "hash_moe", "moe", "moe"),
        index_n_heads=16, index_head_dim=16, index_topk=8, hc_mult=3, routed_scaling_factor=2.5,
        rope_main=RopeParameters("default", 20000.0),
        rope_compress=RopeParameters("yarn", 40000.0, factor=8.0, original_max_position_embeddings=4096,
                                     beta_fast=32.0, beta_slow=1.0, attention_factor=1.0))


def _ds_swa32() -> DeepSeekV4Config:
    """Sliding window 32 (wraps after 32 tokens) with the real compress ratios 4 / 128, and
    a CSA layer first."""
    return preset("mini").replace(sliding_window=32, layer_types=(CSA, SLIDING, HCA, CSA))


CASES: dict[str, Case] = {
    "mini": Case("mini", _ds_mini(), seed=0),
    "wide": Case("wide", _ds_wide(), seed=1),
    # oracle_notes.md: scale the weights up so differences are not hidden by tiny activations
    "scaled": Case("scaled", _ds_mini(), seed=2, weight_scale=2.0),
    "swa32": Case("swa32", _ds_swa32(), seed=3),
    # Long-run variants (slow test only): index_topk >= every possible number of compressed
    # entries, so fp32-noise near-ties at the top-k boundary cannot flip a selection (see
    # test_engine_long_decode_matches_transformers_cached_decode).
    "mini_topk_all": Case("mini_topk_all", _ds_mini().replace(index_topk=1024), seed=0),
    "swa32_topk_all": Case("swa32_topk_all", _ds_swa32().replace(index_topk=1024), seed=3),
}
CASE_NAMES = ["mini", "wide", "scaled", "swa32"]


# ---------------------------------------------------------------------------- Qwen3
def _q3_mini() -> Qwen3Config:
    return preset("qwen3-mini")


Q3_CASES: dict[str, Case] = {
    "mini": Case("mini", _q3_mini(), seed=0),
    "tied_mha": Case("tied_mha", Qwen3Config(
        vocab_size=384, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=24, rope=RopeParameters("default", 10000.0),
        max_position_embeddings=1024, tie_word_embeddings=True), seed=1),
    "yarn_mqa": Case("yarn_mqa", Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=1, head_dim=32,
        rope=RopeParameters("yarn", 1000000.0, factor=4.0, original_max_position_embeddings=128,
                            attention_factor=0.1 * math.log(4.0) + 1.0),
        max_position_embeddings=512), seed=2),
    "scaled": Case("scaled", _q3_mini(), seed=3, weight_scale=2.0),
    "odd": Case("odd", Qwen3Config(
        vocab_size=300, hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=40, max_position_embeddings=1024), seed=4),
}
Q3_CASE_NAMES = list(Q3_CASES)

ZOO_CASES: dict[str, dict[str, Case]] = {"deepseek_v4": CASES, "qwen3": Q3_CASES}
# every (model_type, name) the parametrised ``zoo_case`` fixture runs over (the long-run
# DeepSeek variants are for the slow tests only)
ALL_CASE_IDS = [(mt, n) for mt, names in (("deepseek_v4", CASE_NAMES), ("qwen3", Q3_CASE_NAMES)) for n in names]

# transformers class and default from_pretrained keywords per model_type
HF_CLASSES = {"deepseek_v4": ("DeepseekV4ForCausalLM", {}),
              "qwen3": ("Qwen3ForCausalLM", {"attn_implementation": "eager"})}


class ModelZoo:
    """Lazily written, session-cached checkpoints and loaded models of :data:`ZOO_CASES`."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._tmp = tmp_path_factory
        self._dirs: dict[tuple[str, str], Path] = {}
        self._ours: dict[tuple, tuple] = {}
        self._hf: dict[tuple, torch.nn.Module] = {}

    def case(self, model_type: str, name: str) -> Case:
        return ZOO_CASES[model_type][name]

    def checkpoint(self, model_type: str, name: str) -> Path:
        """Directory of the case's checkpoint (written on first use, once per session)."""
        key = (model_type, name)
        if key not in self._dirs:
            from llm_kernels.checkpoint import write_random_checkpoint

            c = self.case(model_type, name)
            d = self._tmp.mktemp(f"ckpt_{model_type}_{name}")
            write_random_checkpoint(c.cfg, d, seed=c.seed, dtype=torch.float32,
                                    weight_scale=c.weight_scale, progress=False)
            self._dirs[key] = d
        return self._dirs[key]

    def ours(self, model_type: str, name: str, dtype: torch.dtype = torch.float32, quant: str | None = None):
        """``(cfg, weights)`` from ``load_checkpoint``. Treat as read-only (shared)."""
        key = (model_type, name, dtype, quant)
        if key not in self._ours:
            from llm_kernels.checkpoint import load_checkpoint

            kw = {} if quant is None else {"quant": quant}
            self._ours[key] = load_checkpoint(self.checkpoint(model_type, name), dtype=dtype, progress=False, **kw)
        return self._ours[key]

    def hf(self, model_type: str, name: str, dtype: torch.dtype = torch.float32, **kw):
        """The transformers model (eval mode, no grad), cached per keyword set; ``kw`` go to
        ``from_pretrained`` over the model's defaults (Qwen3: eager attention)."""
        key = (model_type, name, dtype, tuple(sorted(kw.items())))
        if key not in self._hf:
            self._hf[key] = self.fresh_hf(model_type, name, dtype, **kw)
        return self._hf[key]

    def fresh_hf(self, model_type: str, name: str, dtype: torch.dtype = torch.float32, **kw):
        """A new (uncached) transformers model, safe to modify."""
        import transformers

        cls_name, defaults = HF_CLASSES[model_type]
        m = getattr(transformers, cls_name).from_pretrained(self.checkpoint(model_type, name), dtype=dtype,
                                                             **{**defaults, **kw})
        m.eval().requires_grad_(False)
        return m

    def for_model(self, model_type: str) -> ModelZooView:
        return ModelZooView(self, model_type)


class ModelZooView:
    """One model's cases with the per-model API of the former ``ModelZoo``/``Qwen3Zoo``
    fixtures (``zoo`` / ``qwen3_zoo``)."""

    def __init__(self, zoo: ModelZoo, model_type: str):
        self.zoo = zoo
        self.model_type = model_type

    def case(self, name: str) -> Case:
        return self.zoo.case(self.model_type, name)

    def checkpoint(self, name: str) -> Path:
        return self.zoo.checkpoint(self.model_type, name)

    def ours(self, name: str, dtype: torch.dtype = torch.float32, quant: str | None = None):
        return self.zoo.ours(self.model_type, name, dtype, quant)

    def hf(self, name: str, dtype: torch.dtype = torch.float32, attn: str | None = None,
           experts: str | None = None):
        """``attn``: attention implementation (Qwen3 default ``"eager"``); ``experts``:
        experts backend (DeepSeek-V4; ``None``: transformers' default, ``grouped_mm`` on
        CPU; ``"eager"``: the per-expert loop accumulating in the model dtype)."""
        return self.zoo.hf(self.model_type, name, dtype, **self._kw(attn, experts))

    def fresh_hf(self, name: str, dtype: torch.dtype = torch.float32, attn: str | None = None,
                 experts: str | None = None):
        return self.zoo.fresh_hf(self.model_type, name, dtype, **self._kw(attn, experts))

    @staticmethod
    def _kw(attn, experts) -> dict:
        kw = {}
        if attn is not None:
            kw["attn_implementation"] = attn
        if experts is not None:
            kw["experts_implementation"] = experts
        return kw


@dataclass(frozen=True)
class ZooCase:
    """One case of the parametrised ``zoo_case`` fixture, bound to the session zoo."""

    model_type: str
    name: str
    zoo: ModelZoo

    @property
    def case(self) -> Case:
        return self.zoo.case(self.model_type, self.name)

    @property
    def cfg(self):
        return self.case.cfg

    def checkpoint(self) -> Path:
        return self.zoo.checkpoint(self.model_type, self.name)

    def ours(self, dtype: torch.dtype = torch.float32, quant: str | None = None):
        return self.zoo.ours(self.model_type, self.name, dtype, quant)

    def hf(self, dtype: torch.dtype = torch.float32, **kw):
        return self.zoo.hf(self.model_type, self.name, dtype, **kw)
