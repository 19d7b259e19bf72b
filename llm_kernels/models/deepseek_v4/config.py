"""Model configurations read from Hugging Face ``config.json`` files, plus presets.

The field names follow the Hugging Face ``DeepseekV4Config`` (transformers 5.x), which in
turn mirrors DeepSeek's release ``config.json``. Older top-level fields that transformers
folds in at load time (``compress_ratios``, ``compress_rate_csa``/``compress_rate_hca``,
``num_hash_layers``, ``qk_rope_head_dim``, flat ``rope_parameters``/``rope_scaling``) are
accepted and folded the same way.

Spec: ``shared/design/deepseek_v4_architecture.md`` §1 (presets, layer schedules) and §5
(RoPE profiles).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...numerics.rope import RopeParameters
from ..config_base import (
    HFFields,
    config_from_json,
    rope_from_hf,
    typed_fields,
    warn_unknown_keys,
)

__all__ = [
    "ConfigError",
    "RopeParameters",
    "DeepSeekV4Config",
    "LAYER_TYPES",
    "MLP_LAYER_TYPES",
    "PRESETS",
    "preset",
    "SLIDING",
    "CSA",
    "HCA",
]


SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
MLP_LAYER_TYPES = ("hash_moe", "moe")
_RATIO_TO_LAYER_TYPE = {0: SLIDING, 4: CSA, 128: HCA}
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")

# Keys of an HF DeepSeek-V4 config.json that carry no meaning for inference here.
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "initializer_range", "use_cache", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "attention_dropout", "pad_token_id", "bos_token_id",
    "eos_token_id", "quantization_config", "expert_dtype", "scale_fmt", "scale_dtype",
    "auto_map", "max_batch_size", "num_key_value_heads", "attention_bias", "mlp_bias",
    "hidden_act", "tie_word_embeddings", "partial_rotary_factor", "rope_theta",
    "compress_rope_theta", "rope_parameters", "rope_scaling", "compress_rates",
    "compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers",
    "qk_rope_head_dim", "layer_types", "mlp_layer_types", "topk_method", "n_group",
    "topk_group", "first_k_dense_replace", "intermediate_size", "kv_lora_rank",
    "qk_nope_head_dim", "v_head_dim", "ep_size", "moe_layer_freq", "aux_loss_alpha",
    "seq_aux", "num_experts", "chat_template", "dim", "n_layers", "n_heads",
}


@dataclass(frozen=True)
class DeepSeekV4Config:
    """DeepSeek-V4 (Flash / Pro) model configuration, HF field names.

    Derived values are properties (``nope_head_dim``, ``softmax_scale``, ``mix_hc``, ...).
    Construct with :meth:`from_hf_dict` / :meth:`from_json` / :func:`preset`; the
    constructor validates every field and raises :class:`ConfigError` naming it.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    compress_rates: tuple[tuple[str, int], ...] = ((CSA, 4), (HCA, 128))
    rope_main: RopeParameters = field(default_factory=RopeParameters)
    rope_compress: RopeParameters = field(default_factory=lambda: RopeParameters("default", 160000.0))
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 0  # MTP blocks (the releases: 1); none unless config.json says so
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        def pos(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                     "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
                     "sliding_window", "hc_mult", "hc_sinkhorn_iters", "index_n_heads",
                     "index_head_dim", "index_topk", "max_position_embeddings"):
            pos(name)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
        if isinstance(self.compress_rates, dict):
            object.__setattr__(self, "compress_rates", tuple(sorted(self.compress_rates.items())))
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise ConfigError(f"qk_rope_head_dim must be even and <= head_dim ({self.head_dim}), "
                              f"got {self.qk_rope_head_dim}")
        if self.qk_rope_head_dim > self.index_head_dim:
            raise ConfigError(f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim "
                              f"({self.qk_rope_head_dim})")
        if self.num_attention_heads % self.o_groups:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be divisible "
                              f"by o_groups ({self.o_groups})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"n_routed_experts ({self.n_routed_experts})")
        if self.n_shared_experts != 1:
            raise ConfigError(f"n_shared_experts must be 1 (one shared SwiGLU expert of width "
                              f"moe_intermediate_size), got {self.n_shared_experts}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_LAYER_TYPES)):
            if len(types) != self.num_hidden_layers:
                raise ConfigError(f"len({name}) = {len(types)} but num_hidden_layers = "
                                  f"{self.num_hidden_layers}")
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ConfigError(f"{name} entries must be in {allowed}, got {bad}")
        rates = dict(self.compress_rates)
        for lt in (CSA, HCA):
            if lt not in rates or not isinstance(rates[lt], int) or rates[lt] <= 0:
                raise ConfigError(f"compress_rates[{lt!r}] must be a positive integer, got {rates.get(lt)!r}")
        if set(rates) - {CSA, HCA}:
            raise ConfigError(f"compress_rates has unknown layer types {sorted(set(rates) - {CSA, HCA})}")
        for name in ("hc_eps", "rms_norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.swiglu_limit < 0:
            raise ConfigError(f"swiglu_limit must be >= 0 (0 disables the clamp), got {self.swiglu_limit}")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=True is not supported by DeepSeek-V4 (separate head.weight)")
        if (not isinstance(self.num_nextn_predict_layers, int) or isinstance(self.num_nextn_predict_layers, bool)
                or self.num_nextn_predict_layers < 0):
            raise ConfigError(f"num_nextn_predict_layers must be an integer >= 0, got {self.num_nextn_predict_layers!r}")

    # ------------------------------------------------------------------ derived
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def partial_rotary_factor(self) -> float:
        return self.qk_rope_head_dim / self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def mix_hc(self) -> int:
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def hc_dim(self) -> int:
        return self.hc_mult * self.hidden_size

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.o_groups

    def mtp_layer(self, k: int = 0) -> int:
        """Layer id of MTP block ``k``: ``num_hidden_layers + k`` (spec §12.1: the MTP block
        is an ordinary layer with ``layer_id = num_hidden_layers``). Raises IndexError when the
        config has no block ``k`` (``num_nextn_predict_layers``)."""
        if not 0 <= k < self.num_nextn_predict_layers:
            raise IndexError(f"MTP block {k} does not exist: num_nextn_predict_layers = "
                             f"{self.num_nextn_predict_layers}")
        return self.num_hidden_layers + k

    def layer_type(self, layer: int) -> str:
        """Attention type of layer id ``layer``: ``layer_types[layer]`` for a decoder layer,
        sliding-window for an MTP block (``compress_ratios`` gives the MTP entry ratio 0 in
        both releases, spec §1.2). Raises IndexError for an id past the MTP blocks."""
        if 0 <= layer < self.num_hidden_layers:
            return self.layer_types[layer]
        self.mtp_layer(layer - self.num_hidden_layers)
        return SLIDING

    def compress_ratio(self, layer: int) -> int:
        """0 for a sliding-window layer, else the layer type's compress rate."""
        lt = self.layer_type(layer)
        return 0 if lt == SLIDING else dict(self.compress_rates)[lt]

    def rope_for_layer(self, layer: int) -> RopeParameters:
        """The layer's RoPE profile: main for SWA layers, compress for CSA/HCA (spec §5.1)."""
        return self.rope_main if self.layer_type(layer) == SLIDING else self.rope_compress

    def is_hash_layer(self, layer: int) -> bool:
        """Hash-routed MoE: ``mlp_layer_types[layer] == "hash_moe"``; never an MTP block (its
        id ``num_hidden_layers`` is past ``num_hash_layers``, spec §12.1)."""
        return layer < self.num_hidden_layers and self.mlp_layer_types[layer] == "hash_moe"

    def replace(self, **changes: Any) -> "DeepSeekV4Config":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "DeepSeekV4Config":
        """Parse an HF ``config.json`` dict (modern or legacy V4 layout), read the way
        transformers reads the same file.

        Unknown keys are ignored with a warning (as transformers keeps them). Raises
        :class:`ConfigError` naming the field for a missing required field, a value of the
        wrong JSON type, or inconsistent values (e.g. ``len(layer_types) != num_hidden_layers``).

        RoPE: ``rope_parameters`` with ``main``/``compress`` sub-dicts is read as given (a
        sub-dict without ``rope_theta`` takes the top-level ``rope_theta``; a YaRN profile
        without ``attention_factor`` gets YaRN's default ``0.1·ln(factor) + 1``, as
        transformers computes it). The legacy flat form (``rope_scaling`` or a flat
        ``rope_parameters``) is the compress profile with ``compress_rope_theta`` and
        ``attention_factor`` 1.0 unless given (transformers injects 1.0 there: DeepSeek's
        reference applies no YaRN mscale); the main profile is plain RoPE.
        """
        f = HFFields(d)
        mt = f.str("model_type", "deepseek_v4")
        if mt != "deepseek_v4":
            raise ConfigError(f"model_type must be 'deepseek_v4', got {mt!r}")
        fields = {fl.name for fl in dataclasses.fields(cls)}
        warn_unknown_keys(set(d) - fields - _IGNORED_KEYS, "DeepSeek-V4")
        if f.int("num_key_value_heads", 1) != 1:
            raise ConfigError(f"num_key_value_heads must be 1 (shared-KV MQA), got {d['num_key_value_heads']}")
        if f.str("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got {d['hidden_act']!r}")
        if f.bool("attention_bias", False) or f.bool("mlp_bias", False):
            raise ConfigError("attention_bias / mlp_bias are not part of DeepSeek-V4")
        f.dict("quantization_config")  # read by the checkpoint loader; must be an object
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "moe_intermediate_size",
                    "n_routed_experts", "num_experts_per_tok")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"config.json is missing required fields {missing}")
        special = ("layer_types", "mlp_layer_types", "compress_rates", "rope_main", "rope_compress",
                   "qk_rope_head_dim")
        kw = typed_fields(f, cls, skip=special, required=required)
        n = kw["num_hidden_layers"]
        head_dim = kw["head_dim"]
        max_pos = kw.get("max_position_embeddings", 1048576)

        # rope dim: qk_rope_head_dim > partial_rotary_factor > nested rope parameters > default 64/512
        prf = f.float("partial_rotary_factor", None)
        rd = f.int("qk_rope_head_dim", None)
        if rd is None:
            rd = int(head_dim * prf) if prf is not None else int(head_dim * 64 / 512)
        if prf is not None and abs(rd - head_dim * prf) > 1e-6:
            raise ConfigError(f"qk_rope_head_dim ({rd}) disagrees with partial_rotary_factor "
                              f"({prf}) * head_dim ({head_dim})")

        # compress rates
        rates = dict(f.dict("compress_rates") or {CSA: 4, HCA: 128})
        for lt, v in rates.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"field 'compress_rates.{lt}' must be an integer, got {type(v).__name__} {v!r}")
        if f.int("compress_rate_csa", None) is not None:
            rates[CSA] = d["compress_rate_csa"]
        if f.int("compress_rate_hca", None) is not None:
            rates[HCA] = d["compress_rate_hca"]

        # layer types
        layer_types = f.list("layer_types", str, "string")
        ratios = f.list("compress_ratios", int, "integer")
        if layer_types is None and ratios is not None:
            if len(ratios) < n:
                raise ConfigError(f"compress_ratios has {len(ratios)} entries, need >= num_hidden_layers ({n})")
            bad = [r for r in ratios if r not in _RATIO_TO_LAYER_TYPE]
            if bad:
                raise ConfigError(f"compress_ratios entries must be 0, 4 or 128, got {bad}")
            layer_types = [_RATIO_TO_LAYER_TYPE[r] for r in ratios[:n]]  # extra entry = MTP layer
        if layer_types is None:
            layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        mlp_layer_types = f.list("mlp_layer_types", str, "string")
        nh = f.int("num_hash_layers", 3)
        if mlp_layer_types is None:
            mlp_layer_types = ["hash_moe"] * min(n, nh) + ["moe"] * max(0, n - nh)

        main, comp = _rope_profiles(f, head_dim, rd, max_pos)
        return cls(qk_rope_head_dim=rd, layer_types=tuple(layer_types),
                   mlp_layer_types=tuple(mlp_layer_types), compress_rates=tuple(sorted(rates.items())),
                   rope_main=main, rope_compress=comp, **kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "DeepSeekV4Config":
        """Read ``config.json`` (or a directory containing it); errors name the file."""
        return config_from_json(cls, path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers-5.x ``config.json`` dict for this config (loadable by
        ``transformers.DeepseekV4Config``)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "num_key_value_heads": 1,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "partial_rotary_factor": self.partial_rotary_factor,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "rope_theta": self.rope_main.rope_theta,
            "compress_rope_theta": self.rope_compress.rope_theta,
            "rope_parameters": {"main": self.rope_main.to_hf(self.partial_rotary_factor),
                                "compress": self.rope_compress.to_hf(self.partial_rotary_factor)},
            "layer_types": list(self.layer_types),
            "mlp_layer_types": list(self.mlp_layer_types),
            "compress_rates": dict(self.compress_rates),
        }
        for f in dataclasses.fields(self):
            if f.name in ("layer_types", "mlp_layer_types", "compress_rates", "rope_main",
                          "rope_compress", "qk_rope_head_dim"):
                continue
            out[f.name] = getattr(self, f.name)
        return out

    def summary(self) -> str:
        kinds = {t: self.layer_types.count(t) for t in LAYER_TYPES}
        return (f"DeepSeek-V4 D={self.hidden_size} L={self.num_hidden_layers} "
                f"(SWA {kinds[SLIDING]}, CSA {kinds[CSA]}, HCA {kinds[HCA]}; "
                f"hash {self.mlp_layer_types.count('hash_moe')}) H={self.num_attention_heads} "
                f"HD={self.head_dim} E={self.n_routed_experts} top{self.num_experts_per_tok} V={self.vocab_size}")



def _rope_profiles(f: HFFields, head_dim: int, rd: int, max_pos: int) -> tuple[RopeParameters, RopeParameters]:
    """``(main, compress)`` RoPE profiles of a config.json, read as transformers'
    ``DeepseekV4Config`` + ``DeepseekV4RotaryEmbedding`` read them (see ``from_hf_dict``)."""
    rope_theta = f.float("rope_theta", 10000.0)
    compress_theta = f.float("compress_rope_theta", 160000.0)
    rp = f.dict("rope_parameters")
    if rp is not None and ("main" in rp or "compress" in rp):
        sub = HFFields(rp, "rope_parameters")
        subs = {label: sub.dict(label) for label in ("main", "compress")}
        for label, v in subs.items():
            if v is None:
                raise ConfigError(f"field 'rope_parameters.{label}' must be an object (rope_parameters "
                                  f"has {'main' if label == 'compress' else 'compress'} but no {label})")
        warn_unknown_keys(set(rp) - {"main", "compress"}, "DeepSeek-V4 rope_parameters (next to main/compress)")
        main = rope_from_hf(subs["main"], rope_theta, "rope_parameters.main", max_position_embeddings=max_pos)
        comp = rope_from_hf(subs["compress"], rope_theta, "rope_parameters.compress", max_position_embeddings=max_pos)
        for label, sd in subs.items():
            p = HFFields(sd, f"rope_parameters.{label}").float("partial_rotary_factor", None)
            if p is not None and abs(p * head_dim - rd) > 1e-6:
                raise ConfigError(f"rope_parameters[{label!r}].partial_rotary_factor disagrees with "
                                  f"qk_rope_head_dim={rd}")
        return main, comp
    where = "rope_parameters" if rp is not None else "rope_scaling"
    flat = dict(rp if rp is not None else (f.dict("rope_scaling") or {}))
    flat["rope_theta"] = compress_theta
    flat.pop("partial_rotary_factor", None)
    comp = rope_from_hf(flat, compress_theta, where, max_position_embeddings=max_pos,
                        default_attention_factor=1.0)
    return RopeParameters("default", rope_theta), comp


# ---------------------------------------------------------------------- presets
_YARN_V4 = RopeParameters("yarn", 160000.0, factor=16.0, original_max_position_embeddings=65536,
                          beta_fast=32.0, beta_slow=1.0, attention_factor=1.0)


def _release(n: int, first: str, **dims: Any) -> DeepSeekV4Config:
    """A release-shaped config (spec §1): ``n`` layers, the first two of type ``first``, then
    CSA and HCA alternating; the first three MoE layers hash-routed; vocab 129280, head_dim
    512, top-6 experts, YaRN compress profile. ``dims`` are the per-release sizes."""
    lt = [first, first] + [CSA if i % 2 == 0 else HCA for i in range(2, n)]
    return DeepSeekV4Config(
        vocab_size=129280, num_hidden_layers=n, head_dim=512, qk_rope_head_dim=64, o_lora_rank=1024,
        num_experts_per_tok=6, layer_types=tuple(lt), mlp_layer_types=tuple(["hash_moe"] * 3 + ["moe"] * (n - 3)),
        rope_main=RopeParameters("default", 10000.0), rope_compress=_YARN_V4, swiglu_limit=10.0, **dims)


def _flash() -> DeepSeekV4Config:
    return _release(43, SLIDING, hidden_size=4096, num_attention_heads=64, q_lora_rank=1024, o_groups=8,
                    moe_intermediate_size=2048, n_routed_experts=256, routed_scaling_factor=1.5, index_topk=512)


def _pro() -> DeepSeekV4Config:
    return _release(61, HCA, hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
                    moe_intermediate_size=3072, n_routed_experts=384, routed_scaling_factor=2.5, index_topk=1024)


def _mini() -> DeepSeekV4Config:
    """Small config exercising every mechanism: SWA, CSA (ratio 4) and HCA (ratio 128)
    layers, a hash-routed MoE layer, sliding window 128, YaRN compress profile, top-2 of 8
    experts, hc_mult 4. 16 indexer heads keep the indexer free of exact score ties
    (``oracle_notes.md``)."""
    return DeepSeekV4Config(
        vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        head_dim=64, qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=32,
        moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
        layer_types=(SLIDING, CSA, HCA, CSA), mlp_layer_types=("hash_moe", "moe", "moe", "moe"),
        rope_main=RopeParameters("default", 10000.0), rope_compress=_YARN_V4,
        routed_scaling_factor=1.5, swiglu_limit=10.0, sliding_window=128,
        index_n_heads=16, index_head_dim=32, index_topk=16)


PRESETS = {"mini": _mini, "flash": _flash, "pro": _pro}


def preset(name: str, num_hidden_layers: int | None = None,
           n_routed_experts: int | None = None, mtp_layers: int | None = None) -> DeepSeekV4Config:
    """A DeepSeek-V4 preset config (``mini``, ``flash``, ``pro``), optionally truncated to the first
    ``num_hidden_layers`` layers (keeping their schedule) and/or ``n_routed_experts``
    experts (top-k is capped at the expert count), with ``mtp_layers`` MTP blocks
    (``num_nextn_predict_layers``; the presets have none: the releases have 1). Raises
    ConfigError for an unknown name or a negative count."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    changes: dict[str, Any] = {}
    if num_hidden_layers is not None:
        if not 1 <= num_hidden_layers:
            raise ConfigError(f"--layers must be >= 1, got {num_hidden_layers}")
        lt = list(cfg.layer_types)
        mlt = list(cfg.mlp_layer_types)
        while len(lt) < num_hidden_layers:  # extend with the preset's periodic tail
            lt.append(lt[-2])
            mlt.append("moe")
        changes.update(num_hidden_layers=num_hidden_layers, layer_types=tuple(lt[:num_hidden_layers]),
                       mlp_layer_types=tuple(mlt[:num_hidden_layers]))
    if n_routed_experts is not None:
        changes.update(n_routed_experts=n_routed_experts,
                       num_experts_per_tok=min(cfg.num_experts_per_tok, n_routed_experts))
    if mtp_layers is not None:
        if mtp_layers < 0:
            raise ConfigError(f"--mtp-layers must be >= 0, got {mtp_layers}")
        changes.update(num_nextn_predict_layers=mtp_layers)
    return cfg.replace(**changes) if changes else cfg
