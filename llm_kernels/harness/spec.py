"""Declarative tensor/scalar specs for golden test cases.

A case declares every argument of the kernel under test as a :class:`TensorSpec`
or :class:`ScalarSpec`.  Initial values are always explicit: there is no implicit
random fill and no implicit zero fill for inputs.  Random initialisers carry their
own seed and draw from a local :class:`torch.Generator`, so building the same spec
twice yields bit-identical tensors and never touches the global RNG state.

Accepted ``init`` forms for a :class:`TensorSpec`:

* a constant init object: :class:`Zeros`, :class:`Ones`, :class:`Full`;
* a seeded random init object: :class:`Normal`, :class:`Uniform`, :class:`RandInt`;
* a concrete :class:`torch.Tensor` (must already have the spec's shape and dtype);
* a callable ``(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Union

import torch

__all__ = [
    "Init",
    "Zeros",
    "Ones",
    "Full",
    "Normal",
    "Uniform",
    "RandInt",
    "TensorSpec",
    "ScalarSpec",
    "Spec",
    "InitLike",
    "build_inputs",
    "describe_init",
]

Shape = tuple[int, ...]
_MISSING: Any = object()


# --------------------------------------------------------------------------- inits
class Init:
    """Base class of the init objects (constant and seeded random).

    Subclasses implement :meth:`build` and :meth:`describe`.  An init object is
    immutable and deterministic: ``build`` returns equal tensors on every call.
    """

    def build(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """Return a new CPU tensor of exactly ``shape`` and ``dtype``."""
        raise NotImplementedError

    def describe(self) -> str:
        """One-line human-readable description (stored in ``manifest.json``)."""
        return repr(self)


@dataclass(frozen=True)
class Zeros(Init):
    """All-zero tensor of any dtype."""

    def build(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """Return ``torch.zeros(shape, dtype=dtype)``."""
        return torch.zeros(shape, dtype=dtype)


@dataclass(frozen=True)
class Ones(Init):
    """All-one tensor of any dtype."""

    def build(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """Return ``torch.ones(shape, dtype=dtype)``."""
        return torch.ones(shape, dtype=dtype)


@dataclass(frozen=True)
class Full(Init):
    """Tensor filled with one constant ``value`` (bool, int or float)."""

    value: Union[bool, int, float]

    def __post_init__(self) -> None:
        if not isinstance(self.value, (bool, int, float)):
            raise TypeError(f"Full(value) needs a bool/int/float, got {type(self.value).__name__}")

    def build(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """Return ``torch.full(shape, value, dtype=dtype)``."""
        return torch.full(shape, self.value, dtype=dtype)


def _check_seed(owner: str, seed: Any) -> int:
    if seed is _MISSING or seed is None:
        raise TypeError(f"{owner} requires an explicit integer seed (e.g. {owner}(..., seed=0))")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{owner} seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{owner} seed must be >= 0, got {seed}")
    return seed


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _sample_dtype(owner: str, dtype: torch.dtype) -> torch.dtype:
    """Dtype in which a float random draw is made before casting to ``dtype``.

    Draws happen in float32 (float64 for float64 targets) so a bf16 and an fp32
    spec with the same seed hold the same values up to rounding.
    """
    if not dtype.is_floating_point:
        raise TypeError(
            f"{owner} needs a floating dtype, got {dtype}; use RandInt for integer/bool tensors"
        )
    return torch.float64 if dtype == torch.float64 else torch.float32


class Normal(Init):
    """Seeded Gaussian ``N(mean, std^2)``; floating dtypes only.

    ``Normal(std=1.0, mean=0.0, seed=...)`` -- the seed is mandatory (positional
    third argument or keyword).  Values are drawn in float32 (float64 for a float64
    target) from a local generator and cast to the spec dtype.

    Raises:
        TypeError: missing/non-int seed; building for a non-floating dtype.
        ValueError: negative ``std`` or seed.
    """

    __slots__ = ("std", "mean", "seed")

    def __init__(self, std: float = 1.0, mean: float = 0.0, seed: int = _MISSING) -> None:
        self.seed = _check_seed("Normal", seed)
        if not (std >= 0 and math.isfinite(std)):
            raise ValueError(f"Normal std must be finite and >= 0, got {std}")
        self.std = float(std)
        self.mean = float(mean)

    def build(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """Draw ``shape`` samples and cast them to ``dtype``."""
        sdt = _sample_dtype("Normal", dtype)
        x = torch.randn(shape, generator=_generator(self.seed), dtype=sdt)
        return (x * self.std + self.mean).to(dtype)

    def __repr__(self) -> str:
        return f"Normal(std={self.std!r}, mean={self.mean!r}, seed={self.seed})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Normal) and (self.std, self.mean, self.seed) == (
            other.std, other.mean, other.seed)

    def __hash__(self) -> int:
        return hash(("Normal", self.std, self.mean, self.seed))


class Uniform(Init):
    """Seeded uniform ``U[low, high)``; floating dtypes only.

    ``Uniform(low, high, seed)`` -- all three are required.

    Raises:
        TypeError: missing/non-int seed; building for a non-floating dtype.
        ValueError: ``low >= high`` or non-finite bounds.
    """

    __slots__ = ("low", "high", "seed")

    def __init__(self, low: float, high: float, seed: int = _MISSING) -> None:
        self.seed = _check_seed("Uniform", seed)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"Uniform needs finite low < high, got low={low}, high={high}")
        self.low = float(low)
        self.high = float(high)

    def build(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """Draw ``shape`` samples and cast them to ``dtype``."""
        sdt = _sample_dtype("Uniform", dtype)
        x = torch.rand(shape, generator=_generator(self.seed), dtype=sdt)
        return (x * (self.high - self.low) + self.low).to(dtype)

    def __repr__(self) -> str:
        return f"Uniform(low={self.low!r}, high={self.high!r}, seed={self.seed})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Uniform) and (self.low, self.high, self.seed) == (
            other.low, other.high, other.seed)

    def __hash__(self) -> int:
        return hash(("Uniform", self.low, self.high, self.seed))


class RandInt(Init):
    """Seeded uniform integers in ``[low, high)``; any real dtype (int, bool, float).

    ``RandInt(low, high, seed)`` -- all three are required.  Values are drawn as
    int64 and cast; the range must fit the target dtype.

    Raises:
        TypeError: missing/non-int seed or bounds.
        ValueError: ``low >= high``; at build time, a range outside the dtype's range.
    """

    __slots__ = ("low", "high", "seed")

    def __init__(self, low: int, high: int, seed: int = _MISSING) -> None:
        self.seed = _check_seed("RandInt", seed)
        for nm, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"RandInt {nm} must be an int, got {type(v).__name__}")
        if low >= high:
            raise ValueError(f"RandInt needs low < high, got low={low}, high={high}")
        self.low = low
        self.high = high

    def build(self, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """Draw ``shape`` int64 samples in ``[low, high)`` and cast them to ``dtype``."""
        if dtype.is_complex:
            raise TypeError(f"RandInt does not support complex dtype {dtype}")
        if dtype == torch.bool:
            lo, hi = 0, 1
        elif dtype.is_floating_point:
            lo, hi = -math.inf, math.inf
        else:
            info = torch.iinfo(dtype)
            lo, hi = info.min, info.max
        if self.low < lo or self.high - 1 > hi:
            raise ValueError(f"RandInt range [{self.low}, {self.high}) does not fit {dtype}")
        x = torch.randint(self.low, self.high, shape, generator=_generator(self.seed),
                          dtype=torch.int64)
        return x.to(dtype)

    def __repr__(self) -> str:
        return f"RandInt(low={self.low}, high={self.high}, seed={self.seed})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RandInt) and (self.low, self.high, self.seed) == (
            other.low, other.high, other.seed)

    def __hash__(self) -> int:
        return hash(("RandInt", self.low, self.high, self.seed))


InitLike = Union[Init, torch.Tensor, Callable[[Shape, torch.dtype], torch.Tensor]]


def describe_init(init: Any) -> str:
    """One-line description of an ``init`` value (for manifests and messages)."""
    if init is None:
        return "none (pure output)"
    if isinstance(init, Init):
        return init.describe()
    if isinstance(init, torch.Tensor):
        return f"tensor(shape={tuple(init.shape)}, dtype={init.dtype})"
    name = getattr(init, "__qualname__", None) or type(init).__name__
    mod = getattr(init, "__module__", None)
    return f"callable {mod + '.' if mod else ''}{name}"


# --------------------------------------------------------------------------- specs
def _normalize_shape(name: str, shape: Any) -> Shape:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"spec {name!r}: shape must be a sequence of ints, got {shape!r}") from None
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"spec {name!r}: shape entries must be ints, got {shape!r}")
        if d < 0:
            raise ValueError(f"spec {name!r}: negative dimension in shape {shape!r}")
        out.append(int(d))
    return tuple(out)


def _check_tensor(name: str, t: Any, shape: Shape, dtype: torch.dtype, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor {name!r}: {what} returned {type(t).__name__}, expected torch.Tensor")
    if tuple(t.shape) != shape:
        raise ValueError(
            f"tensor {name!r}: {what} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != dtype:
        raise ValueError(f"tensor {name!r}: {what} has dtype {t.dtype}, expected {dtype}")
    return t


@dataclass(eq=False)
class TensorSpec:
    """Declaration of one tensor argument of a case.

    Args:
        name: unique argument name; the key of the tensor in the input/output dicts.
        shape: tuple of non-negative ints.
        dtype: a ``torch.dtype``.
        init: explicit initial value (see the module docstring for the accepted
            forms).  Required for inputs; ``None`` is allowed only for a pure
            output (``is_output=True``).
        is_output: the tensor is an output to validate.  ``is_output=True`` with an
            ``init`` is an in/out tensor (state such as a KV cache): its initial
            value is an input and its final value, returned by golden/impl under
            the same name, is compared.

    Raises:
        ValueError: empty name; ``init=None`` for an input; negative dimension;
            a tensor ``init`` whose shape/dtype differ from the spec.
        TypeError: ``dtype`` not a ``torch.dtype``; an unsupported ``init`` form
            (e.g. a bare number -- use ``Full(value)``).
    """

    name: str
    shape: Shape
    dtype: torch.dtype
    init: InitLike | None = None
    is_output: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TensorSpec name must be a non-empty str, got {self.name!r}")
        self.shape = _normalize_shape(self.name, self.shape)
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"spec {self.name!r}: dtype must be a torch.dtype, got {self.dtype!r}")
        init = self.init
        if init is None:
            if not self.is_output:
                raise ValueError(
                    f"spec {self.name!r}: input tensors need an explicit init "
                    "(Zeros(), Ones(), Full(v), Normal(..., seed=), Uniform(lo, hi, seed), "
                    "RandInt(lo, hi, seed), a tensor or a callable (shape, dtype) -> tensor)")
        elif isinstance(init, torch.Tensor):
            _check_tensor(self.name, init, self.shape, self.dtype, "init tensor")
        elif isinstance(init, Init) or callable(init):
            pass
        else:
            raise TypeError(
                f"spec {self.name!r}: unsupported init {init!r} ({type(init).__name__}); use an "
                "Init object (Zeros/Ones/Full/Normal/Uniform/RandInt), a tensor or a callable")

    @property
    def is_input(self) -> bool:
        """True when the tensor has an initial value passed to golden/impl."""
        return self.init is not None

    def build(self) -> torch.Tensor:
        """Materialise the initial value as a fresh CPU tensor of ``shape``/``dtype``.

        Raises:
            ValueError: pure output spec (nothing to build); the init produced a
                tensor of the wrong shape/dtype.
            TypeError: a callable init returned a non-tensor.
        """
        init = self.init
        if init is None:
            raise ValueError(f"spec {self.name!r} is a pure output and has no initial value")
        if isinstance(init, torch.Tensor):
            t = init.detach().clone()
            what = "init tensor"
        elif isinstance(init, Init):
            t = init.build(self.shape, self.dtype)
            what = f"init {init.describe()}"
        else:
            t = init(self.shape, self.dtype)
            what = f"init {describe_init(init)}"
        return _check_tensor(self.name, t, self.shape, self.dtype, what)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (name, kind, shape, dtype, init, is_output)."""
        return {
            "name": self.name,
            "kind": "tensor",
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "init": describe_init(self.init),
            "is_output": self.is_output,
        }


@dataclass(frozen=True)
class ScalarSpec:
    """Declaration of one scalar argument (passed to golden/impl as a Python value).

    Args:
        name: unique argument name.
        value: a ``bool``, ``int`` or ``float``.

    Raises:
        ValueError: empty name.
        TypeError: ``value`` is not bool/int/float.
    """

    name: str
    value: Union[bool, int, float]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ScalarSpec name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.value, (bool, int, float)):
            raise TypeError(
                f"scalar {self.name!r}: value must be bool/int/float, got {type(self.value).__name__}")

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (name, kind, type, value)."""
        return {"name": self.name, "kind": "scalar", "type": type(self.value).__name__,
                "value": self.value}


Spec = Union[TensorSpec, ScalarSpec]


def check_unique_names(specs: Iterable[Spec]) -> None:
    """Raise ``ValueError`` if two specs share a name or an entry is not a spec."""
    seen: set[str] = set()
    for s in specs:
        if not isinstance(s, (TensorSpec, ScalarSpec)):
            raise TypeError(f"expected TensorSpec or ScalarSpec, got {type(s).__name__}")
        if s.name in seen:
            raise ValueError(f"duplicate spec name {s.name!r}")
        seen.add(s.name)


def build_inputs(specs: Iterable[Spec]) -> dict[str, Any]:
    """Build the input dict of a case.

    Returns ``{name: value}`` in spec order for every :class:`TensorSpec` with an
    ``init`` (inputs and in/out tensors; a fresh CPU tensor of the spec's exact
    shape/dtype) and every :class:`ScalarSpec` (its Python value).  Pure outputs
    (``is_output=True, init=None``) are not included.  Deterministic: the same
    specs always produce bit-identical tensors.

    Raises:
        ValueError: duplicate names; an init produced a tensor whose shape or dtype
            differs from the spec (the message names the tensor, expected and actual).
        TypeError: a non-spec entry; a callable init returned a non-tensor.
    """
    specs = list(specs)
    check_unique_names(specs)
    out: dict[str, Any] = {}
    for s in specs:
        if isinstance(s, ScalarSpec):
            out[s.name] = s.value
        elif s.is_input:
            out[s.name] = s.build()
    return out


def check_inputs(specs: Iterable[Spec], values: Mapping[str, Any], source: str) -> None:
    """Check externally supplied input values (e.g. frozen data) against the specs.

    Raises:
        KeyError: a needed input is missing (all missing names are listed).
        ValueError: a tensor has the wrong shape/dtype or a scalar's value differs.
    """
    specs = list(specs)
    missing = [s.name for s in specs
               if (isinstance(s, ScalarSpec) or s.is_input) and s.name not in values]
    if missing:
        raise KeyError(f"{source} lacks input(s) {missing}")
    for s in specs:
        if isinstance(s, ScalarSpec):
            v = values[s.name]
            same = v == s.value or (isinstance(v, float) and isinstance(s.value, float)
                                    and math.isnan(v) and math.isnan(s.value))
            if not same or type(v) is not type(s.value):
                raise ValueError(
                    f"{source}: scalar {s.name!r} is {v!r}, spec says {s.value!r} (stale data?)")
        elif s.is_input:
            _check_tensor(s.name, values[s.name], s.shape, s.dtype, source)
