"""Config reading shared by every model: the ``config.json`` reader, typed field access
(:class:`HFFields`: a wrong JSON type raises :class:`ConfigError` naming the field, never a
bare ``TypeError``/``ValueError``) and the HF rope sub-dict parser. Model config classes
live in ``models/<name>/config.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..numerics.rope import RopeParameters

__all__ = ["config_from_json", "ConfigError", "HFFields", "read_config_json", "rope_from_hf", "typed_fields", "warn_unknown_keys",
           "yarn_default_attention_factor"]

_MISSING = object()


def read_config_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(file, parsed dict)`` of ``config.json`` at ``path`` (the file, or a directory
    holding it). Raises ConfigError when it is missing, not valid JSON or not a JSON object."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"no config.json at {p}")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: config.json must be a JSON object, got {_describe(d)}")
    return p, d


def _describe(v: Any) -> str:
    """``str '4096'``, ``list [1, 2]``, ... (type name and a short repr) for messages."""
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


def warn_unknown_keys(keys: set[str], model: str, where: str = "config.json") -> None:
    """Warn (as transformers does: they are kept, not used) about keys this reader does not know."""
    if keys:
        warnings.warn(f"{where}: ignoring unknown {model} config keys {sorted(keys)}", UserWarning, stacklevel=3)


def yarn_default_attention_factor(factor: float, mscale: Any = None, mscale_all_dim: Any = None) -> float:
    """YaRN's cos/sin scale when ``attention_factor`` is not given, exactly as transformers'
    ``modeling_rope_utils._compute_yarn_parameters``: ``get_mscale(factor, mscale) /
    get_mscale(factor, mscale_all_dim)`` when both are set (truthy), else
    ``get_mscale(factor) = 0.1·ln(factor) + 1`` (1.0 for ``factor <= 1``)."""
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return float(get_mscale(factor))


class HFFields:
    """Typed access to one HF config dict (or sub-dict ``prefix``). Each getter returns the
    value or ``default`` when the key is absent (or ``null``, for optional fields), and
    raises ``ConfigError("field 'x' must be ..., got str '4096'")`` for a wrong JSON type.

    JSON types follow transformers' strict config dataclasses: an integer field takes only
    an int (not a float such as ``4096.0``, not a bool), a float field an int or a float
    (not a bool), a bool field only ``true``/``false``.
    """

    def __init__(self, d: Any, prefix: str = ""):
        if not isinstance(d, dict):
            raise ConfigError(f"field {prefix or 'config'!r} must be an object, got {_describe(d)}")
        self.d = d
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, expected: str, v: Any) -> ConfigError:
        return ConfigError(f"field {self.name(key)!r} must be {expected}, got {_describe(v)}")

    def _raw(self, key: str, default: Any) -> tuple[bool, Any]:
        """``(True, default)`` when the key is absent (or null and the field is optional,
        i.e. has a default), else ``(False, value)``."""
        v = self.d.get(key)
        if v is None:
            if default is not _MISSING:
                return True, default
            if key not in self.d:
                raise ConfigError(f"config.json is missing required field {self.name(key)!r}")
        return False, v

    def int(self, key: str, default: Any = _MISSING) -> Any:
        absent, v = self._raw(key, default)
        if not absent and (isinstance(v, bool) or not isinstance(v, int)):
            raise self.error(key, "an integer", v)
        return v

    def float(self, key: str, default: Any = _MISSING) -> Any:
        absent, v = self._raw(key, default)
        if absent:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(key, "a finite number", v)
        return float(v)

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        absent, v = self._raw(key, default)
        if not absent and not isinstance(v, bool):
            raise self.error(key, "a boolean (true/false)", v)
        return v

    def str(self, key: str, default: Any = _MISSING) -> Any:
        absent, v = self._raw(key, default)
        if not absent and not isinstance(v, str):
            raise self.error(key, "a string", v)
        return v

    def dict(self, key: str, default: Any = None) -> Any:
        """An object (or ``default`` when absent or ``null``)."""
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, dict):
            raise self.error(key, "an object", v)
        return v

    def list(self, key: str, item: type, item_desc: str, default: Any = None) -> Any:
        """A list whose entries are ``item`` instances (a bool is never an int), or
        ``default`` when absent or ``null``. ``item_desc``: ``"string"``, ``"integer"``."""
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, list):
            raise self.error(key, f"a list of {item_desc}s", v)
        article = "an" if item_desc[0] in "aeiou" else "a"
        for i, x in enumerate(v):
            if not isinstance(x, item) or (isinstance(x, bool) and item is not bool):
                raise ConfigError(f"field '{self.name(key)}[{i}]' must be {article} {item_desc}, got {_describe(x)}")
        return v

    def token_id(self, key: str, default: Any) -> Any:
        """``bos_token_id``/``eos_token_id``: an int, a list of ints (first one used) or null."""
        if key not in self.d:
            return default
        v = self.d[key]
        if isinstance(v, list):
            self.list(key, int, "integer")
            return v[0] if v else None
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise self.error(key, "an integer, a list of integers or null", v)
        return v


def rope_from_hf(d: Any, default_theta: float, where: str, *, max_position_embeddings: int | None = None,
                 default_attention_factor: float | None = None) -> RopeParameters:
    """Build from one HF rope sub-dict (keys ``rope_type``/``type``, ``rope_theta``, ...).

    ``attention_factor`` of a YaRN profile: the given value, else ``default_attention_factor``
    when the caller knows transformers injects one (DeepSeek-V4's legacy flat form: 1.0),
    else transformers' YaRN default (:func:`yarn_default_attention_factor` of ``factor``,
    ``mscale``, ``mscale_all_dim``). ``factor`` is required for YaRN (as in transformers);
    ``original_max_position_embeddings`` defaults to ``max_position_embeddings`` when that
    is given (transformers' ``standardize_rope_params``)."""
    f = HFFields(d, where)
    known = {
        "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
        "beta_fast", "beta_slow", "attention_factor", "partial_rotary_factor",
        "mscale", "mscale_all_dim", "truncate",
    }
    # transformers ignores unrecognized rope keys with a warning (_check_received_keys)
    warn_unknown_keys(set(d) - known, "RoPE", where=f"field {where!r}")
    rope_type = f.str("rope_type", None)
    if rope_type is None:
        rope_type = f.str("type", "default")
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"field '{where}.rope_type' {rope_type!r} is not supported "
                          "(expected 'default' or 'yarn')")
    if f.bool("truncate", True) is not True:
        raise ConfigError(f"field '{where}.truncate' = false is not supported")
    theta = f.float("rope_theta", default_theta)
    if rope_type == "default":
        return RopeParameters("default", theta)
    orig = f.int("original_max_position_embeddings",
                 _MISSING if max_position_embeddings is None else max_position_embeddings)
    factor = f.float("factor")
    beta_fast = f.float("beta_fast", None)
    beta_slow = f.float("beta_slow", None)
    attention_factor = f.float("attention_factor", None)
    mscale, mscale_all_dim = f.float("mscale", None), f.float("mscale_all_dim", None)
    if attention_factor is None:
        attention_factor = (default_attention_factor if default_attention_factor is not None
                            else yarn_default_attention_factor(factor, mscale, mscale_all_dim))
    try:
        return RopeParameters(
            "yarn", theta, factor=factor, original_max_position_embeddings=orig,
            beta_fast=beta_fast or 32.0, beta_slow=beta_slow or 1.0, attention_factor=attention_factor)
    except ConfigError as e:
        raise ConfigError(f"field {where!r}: {e}") from None


def typed_fields(f: HFFields, cls: type, skip: set[str] | tuple[str, ...] = (),
                 required: set[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The dataclass fields of ``cls`` present in the dict, type-checked by their
    annotation (``int``, ``float``, ``bool``, ``str``; ``int | None`` is a token id: an int,
    a list of ints or null). An optional field set to ``null`` is left out (the dataclass
    default applies); a ``required`` one raises ConfigError."""
    skip_ = object()
    out: dict[str, Any] = {}
    for fld in dataclasses.fields(cls):
        if fld.name in skip or fld.name not in f.d:
            continue
        ann = fld.type if isinstance(fld.type, str) else getattr(fld.type, "__name__", repr(fld.type))
        default = _MISSING if fld.name in required else skip_
        if ann == "int | None":
            v = f.token_id(fld.name, skip_)
        elif ann in ("int", "float", "bool", "str"):
            v = getattr(f, ann)(fld.name, default)
        else:
            raise TypeError(f"typed_fields: no JSON type for {cls.__name__}.{fld.name}: {ann}")
        if v is not skip_:
            out[fld.name] = v
    return out


def config_from_json(cls: Any, path: str | Path) -> Any:
    """``cls.from_hf_dict`` of the ``config.json`` at ``path`` (the file or its directory);
    ConfigErrors name the file."""
    p, d = read_config_json(path)
    try:
        return cls.from_hf_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
