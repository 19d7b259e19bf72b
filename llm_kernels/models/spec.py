"""The :class:`ModelSpec` record: what the shared code needs to know about one model family
(registered in :mod:`llm_kernels.models`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """What the shared code needs to know about one model family.

    Config and presets:
        model_type: ``config.json`` ``model_type``.
        config_class: parses ``config.json`` (``from_hf_dict(d)``) and writes it back
            (``to_hf_dict()``); has ``summary()``, ``vocab_size``, ``num_hidden_layers``.
        presets: preset name -> factory ``(num_hidden_layers=None, n_routed_experts=None)``
            returning a config (raise ConfigError for an option that does not apply).
        default_preset: the preset of the embedded default checkpoint.
    Weights (``models/<name>/weights.py``; names are the checkpoint's canonical names):
        expected_float_tensors(cfg) -> {name: TensorInfo}; canonical_name(stored) -> name;
        is_ignored(stored) -> bool; is_fp32_tensor(name) -> bool (kept fp32 at any dtype);
        is_w8a8_weight(name) -> bool (INT8 in the W8A8 format); w8a8_modules: description
        written into ``quantization_config``; init_tensor(name, info, cfg, generator,
        weight_scale) -> float32/int64 tensor; check_int_tensor(name, t, cfg) -> problem or None.
    Runtime:
        stages(backend) -> ops namespace (``"reference"`` torch, ``"fused"`` kernels);
        backend_stages(backend) -> {stage: "reference" | "fused"};
        make_engine(weights, cfg, *, dtype, max_seq_len, backend, timer, max_batch) -> engine
            with ``prefill``/``decode``/``step`` (:class:`~llm_kernels.runtime.engine_core.EngineCore`).
    Harness, bench, profile (optional):
        golden_cases(checkpoint or None) -> list of harness cases;
        extras: model-specific hooks by name (``"bench"``, ``"roofline"``, ...).
    """

    model_type: str
    config_class: type
    presets: Mapping[str, Callable[..., Any]]
    default_preset: str
    expected_float_tensors: Callable[[Any], dict]
    canonical_name: Callable[[str], str]
    is_ignored: Callable[[str], bool]
    is_fp32_tensor: Callable[[str], bool]
    is_w8a8_weight: Callable[[str], bool]
    w8a8_modules: tuple[str, ...]
    init_tensor: Callable[..., Any]
    check_int_tensor: Callable[..., str | None]
    stages: Callable[[str], Any]
    backend_stages: Callable[[str], dict]
    make_engine: Callable[..., Any]
    golden_cases: Callable[[Path | None], list] | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
