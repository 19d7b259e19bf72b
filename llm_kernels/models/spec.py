"""The :class:`ModelSpec` record: what the shared code needs to know about one model family
(registered in :mod:`llm_kernels.models`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["ModelSpec", "weight_fields", "WEIGHT_FIELDS"]


@dataclass(frozen=True)
class ModelSpec:
    """What the shared code needs to know about one model family.

    Config and presets:
        model_type: ``config.json`` ``model_type``.
        config_class: parses ``config.json`` (``from_hf_dict(d)``) and writes it back
            (``to_hf_dict()``); has ``summary()``, ``vocab_size``, ``num_hidden_layers``.
        presets: preset name -> factory ``(num_hidden_layers=None, n_routed_experts=None,
            mtp_layers=None)``
            returning a config (raise ConfigError for an option that does not apply).
        default_preset: the preset of the embedded default checkpoint.
    Weights (``models/<name>/weights.py``; names are the checkpoint's canonical names):
        expected_float_tensors(cfg) -> {name: TensorInfo}; canonical_name(stored) -> name;
        is_ignored(stored, cfg) -> bool; pipeline_part(name, cfg) -> the decoder layer index
        of a tensor, ``"embed"`` / ``"head"`` / ``"embed_head"`` (first / last / both pipeline
        stages) or None (every stage); is_fp32_tensor(name) -> bool (kept fp32 at any dtype);
        is_w8a8_weight(name) -> bool (INT8 in the W8A8 format); w8a8_modules: description
        written into ``quantization_config``; is_int8_weight(name) / int8_modules: the same
        for the ``int8`` scheme (every 2-D weight a Q8-class format quantises; default: the
        W8A8 set); init_tensor(name, info, cfg, generator,
        weight_scale) -> float32/int64 tensor; check_int_tensor(name, t, cfg) -> problem or None.
        Release formats (optional): release_format(name) -> "fp8" | "mxfp4" | None (how the
        model's official quantised release stores the weight), release_scale_name(name) ->
        its scale tensor's name, release_scale_fmt ("ue8m0" / "bf16" / "float"),
        release_quant_extra: extra ``quantization_config`` keys of the release.
    Runtime:
        stage_table() -> the model's :class:`~llm_kernels.runtime.stage_table.StageTable`
            (a function, so reading a config does not import the kernels); the methods
            :meth:`stages` / :meth:`backend_stages` look backends up in it;
        make_engine(weights, cfg, *, dtype, max_seq_len, backend, timer, max_batch,
            consume_weights=False, layers=None) -> engine (``consume_weights``: the engine may
            replace the dict's entries by their prepared forms, freeing raw INT8 copies as it
            goes; ``layers``: ``(first, stop)``, the decoder layers of one pipeline stage,
            default all)
            with ``prefill``/``decode``/``step`` (:class:`~llm_kernels.runtime.engine_core.EngineCore`).
    Harness, bench, profile (optional):
        golden_builder(checkpoint or None) -> list of harness cases, and golden_env: the
            environment variable naming the checkpoint to use (:meth:`golden_cases`);
        extras: model-specific hooks by name (``"trace_roofline"``: the profile's byte model).
    """

    model_type: str
    config_class: type
    presets: Mapping[str, Callable[..., Any]]
    default_preset: str
    expected_float_tensors: Callable[[Any], dict]
    canonical_name: Callable[[str], str]
    is_ignored: Callable[[str, Any], bool]
    is_fp32_tensor: Callable[[str], bool]
    is_w8a8_weight: Callable[[str], bool]
    w8a8_modules: tuple[str, ...]
    init_tensor: Callable[..., Any]
    check_int_tensor: Callable[..., str | None]
    stage_table: Callable[[], Any]
    make_engine: Callable[..., Any]
    golden_builder: Callable[[Path | None], list] | None = None
    golden_env: str | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    is_int8_weight: Callable[[str], bool] | None = None
    int8_modules: tuple[str, ...] = ()
    release_format: Callable[[str], str | None] | None = None
    release_scale_name: Callable[[str], str] | None = None
    release_scale_fmt: str = "ue8m0"
    release_quant_extra: Mapping[str, Any] = field(default_factory=dict)
    pipeline_part: Callable[[str, Any], int | str | None] | None = None

    def quantized_weight(self, scheme: str) -> Callable[[str], bool]:
        """The predicate naming the weights stored INT8 under quantisation ``scheme``
        (``"w8a8"``: the model's W8A8 set; ``"int8"``: :attr:`is_int8_weight`, or the W8A8
        set when the model defines none). Raises ValueError for another scheme."""
        if scheme == "w8a8":
            return self.is_w8a8_weight
        if scheme in ("int8", "int8_g32"):
            return self.is_int8_weight or self.is_w8a8_weight
        raise ValueError(f"quantisation scheme must be 'w8a8', 'int8' or 'int8_g32', got {scheme!r}")

    def quantized_modules(self, scheme: str) -> tuple[str, ...]:
        """Description of :meth:`quantized_weight`'s set (written into ``quantization_config``)."""
        self.quantized_weight(scheme)
        return self.int8_modules if scheme != "w8a8" and self.int8_modules else self.w8a8_modules

    def stages(self, backend: str) -> Any:
        """The ops namespace of ``backend`` ("reference" or "fused"); ValueError otherwise."""
        return self.stage_table().stages(backend)

    def backend_stages(self, backend: str) -> dict[str, str]:
        """{stage: "fused" | "reference"} of ``backend``."""
        return self.stage_table().backend_stages(backend)

    def golden_cases(self, checkpoint: Path | None = None) -> list:
        """The model's golden harness cases over ``checkpoint`` (default: ``$<golden_env>``,
        else the builder's embedded default); [] for a model without cases."""
        if self.golden_builder is None:
            return []
        env = os.environ.get(self.golden_env) if self.golden_env else None
        return self.golden_builder(checkpoint or (Path(env) if env else None))


# The ModelSpec fields a model's ``weights.py`` provides under the same names.
WEIGHT_FIELDS = ("expected_float_tensors", "canonical_name", "is_ignored", "is_fp32_tensor", "is_w8a8_weight",
                 "init_tensor", "check_int_tensor", "pipeline_part")


def weight_fields(weights_module: Any) -> dict[str, Any]:
    """The weight-table fields of a :class:`ModelSpec` from a ``models/<name>/weights.py``
    module that defines :data:`WEIGHT_FIELDS` and ``W8A8_MODULES`` (and optionally
    ``is_int8_weight`` + ``INT8_MODULES``). Raises AttributeError naming a missing one."""
    out = {name: getattr(weights_module, name) for name in WEIGHT_FIELDS}
    out["w8a8_modules"] = tuple(weights_module.W8A8_MODULES)
    if hasattr(weights_module, "is_int8_weight"):
        out["is_int8_weight"] = weights_module.is_int8_weight
        out["int8_modules"] = tuple(weights_module.INT8_MODULES)
    if hasattr(weights_module, "release_format"):
        out["release_format"] = weights_module.release_format
        out["release_scale_name"] = weights_module.release_scale_name
        out["release_scale_fmt"] = weights_module.RELEASE_SCALE_FMT
        out["release_quant_extra"] = dict(weights_module.RELEASE_QUANT_EXTRA)
    return out
