"""The model registry: one :class:`ModelSpec` per ``config.json`` ``model_type``.

Everything that differs between model families is reached through a spec, so no code
outside ``models/`` branches on the model type. A new model is one folder
(``models/<name>/``: config, weight table, spec) plus one :func:`register` call: the
built-in models register themselves when their package is imported, and
``llm_kernels/__init__.py`` imports them (so this module imports no model, and loading a
checkpoint through the registry never forms an import cycle).

Usage::

    from llm_kernels import models
    spec = models.spec_for_config(cfg)          # or models.get("qwen3")
    cfg = models.load_config("path/to/ckpt")    # dispatches on config.json's model_type
    cfg = models.preset("flash", num_hidden_layers=3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config_base import read_config_json
from .spec import ModelSpec

__all__ = ["ModelSpec", "register", "unregister", "get", "spec_for_config", "load_config", "preset",
           "preset_names", "model_types", "DEFAULT_MODEL_TYPE"]

# A config.json without model_type reads as DeepSeek-V4 (the project's original format).
DEFAULT_MODEL_TYPE = "deepseek_v4"


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` under its ``model_type``; raises ValueError if the type or one of its
    preset names is already taken."""
    if spec.model_type in _REGISTRY:
        raise ValueError(f"model_type {spec.model_type!r} is already registered")
    taken = {p for s in _REGISTRY.values() for p in s.presets}
    clash = sorted(taken & set(spec.presets))
    if clash:
        raise ValueError(f"preset names {clash} are already used by another model")
    if spec.default_preset not in spec.presets:
        raise ValueError(f"default_preset {spec.default_preset!r} is not one of {sorted(spec.presets)}")
    _REGISTRY[spec.model_type] = spec
    return spec


def unregister(model_type: str) -> None:
    """Remove a registered model (tests that register toy models clean up with this)."""
    _REGISTRY.pop(model_type, None)


def model_types() -> list[str]:
    """The registered ``model_type`` names, sorted."""
    return sorted(_REGISTRY)


def get(model_type: str) -> ModelSpec:
    """The spec of ``model_type``; raises ConfigError naming the supported types."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ConfigError(f"model_type {model_type!r} is not supported; expected one of {model_types()}") from None


def spec_for_config(cfg: Any) -> ModelSpec:
    """The spec whose ``config_class`` ``cfg`` is an instance of; raises TypeError otherwise."""
    for spec in _REGISTRY.values():
        if isinstance(cfg, spec.config_class):
            return spec
    raise TypeError(f"{type(cfg).__name__} is not the config class of a registered model ({model_types()})")


def load_config(path: str | Path) -> Any:
    """Read ``config.json`` (or a directory holding it) and parse it with the config class
    of its ``model_type`` (missing: :data:`DEFAULT_MODEL_TYPE`). Raises ConfigError for a
    missing file, bad JSON, a config.json that is not an object, a ``model_type`` that is
    not a string or not registered, or a bad field (the message names the file and field)."""
    p, d = read_config_json(path)
    mt = d.get("model_type", DEFAULT_MODEL_TYPE)
    if not isinstance(mt, str):
        raise ConfigError(f"{p}: field 'model_type' must be a string, got {type(mt).__name__} {mt!r}")
    if mt not in _REGISTRY:
        raise ConfigError(f"{p}: model_type {mt!r} is not supported; expected one of {model_types()}")
    try:
        return _REGISTRY[mt].config_class.from_hf_dict(d)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from e


def preset_names() -> list[str]:
    """Every preset name of every registered model, sorted."""
    return sorted(p for s in _REGISTRY.values() for p in s.presets)


def preset(name: str, num_hidden_layers: int | None = None, n_routed_experts: int | None = None,
           mtp_layers: int | None = None) -> Any:
    """The config of preset ``name`` (any registered model), optionally truncated to the first
    ``num_hidden_layers`` layers and/or ``n_routed_experts`` experts, with ``mtp_layers``
    multi-token-prediction blocks. Raises ConfigError for an unknown name or an option the
    model does not have."""
    for spec in _REGISTRY.values():
        if name in spec.presets:
            kw = {} if mtp_layers is None else {"mtp_layers": mtp_layers}
            return spec.presets[name](num_hidden_layers=num_hidden_layers, n_routed_experts=n_routed_experts, **kw)
    raise ConfigError(f"unknown preset {name!r}; choose from {preset_names()}")
