"""Golden-case runner: build inputs, compute golden, run impl, compare, save/replay.

A :class:`GoldenCase` bundles input specs, a golden (reference) function, the
implementation under test and one comparator per output.  :func:`run_case` prints
exactly one ``PASS <case>/<output>: <message>`` or ``FAIL <case>/<output>: <message>``
line per output, after evaluating *all* outputs, and returns a :class:`CaseResult`.

Save/replay: ``save_data=DIR`` freezes ``inputs.safetensors``, ``golden.safetensors``
and ``manifest.json`` into ``DIR``; ``golden_data=DIR`` loads the frozen inputs and
golden outputs instead of building/recomputing them (the golden function is not
called).  :func:`run_cases` / :func:`main` always use one sub-directory per case.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TextIO, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .compare import CompareResult
from .spec import (
    ScalarSpec,
    Spec,
    TensorSpec,
    build_inputs,
    check_inputs,
    check_unique_names,
)

__all__ = [
    "GoldenCase",
    "CaseResult",
    "GoldenDataError",
    "run_case",
    "run_cases",
    "main",
    "save_case_data",
    "load_case_data",
    "case_dir_name",
]

INPUTS_FILE = "inputs.safetensors"
GOLDEN_FILE = "golden.safetensors"
MANIFEST_FILE = "manifest.json"
_SCALARS_KEY = "llm_kernels.scalars"
_RUNNER = "runner"

PathLike = Union[str, Path]
CaseFn = Callable[[dict[str, Any]], Mapping[str, torch.Tensor]]


class GoldenDataError(RuntimeError):
    """Frozen golden data is missing, incomplete or does not match the case's specs."""


@dataclass
class GoldenCase:
    """One golden test case.

    Args:
        name: case name, used in output lines (``PASS <name>/<output>``), in ``-k``
            filtering and (sanitised by :func:`case_dir_name`) as the save/replay
            sub-directory.
        inputs: ordered list of :class:`TensorSpec` / :class:`ScalarSpec`.  A
            ``TensorSpec`` with ``is_output=True`` declares an output; its golden
            value is checked against the spec's shape/dtype.
        golden: ``golden(values) -> {output_name: tensor}``; ``values`` maps every
            input/in-out tensor name to a private clone and every scalar to its
            Python value.  May modify ``values`` freely.
        impl: the implementation under test, same calling convention (gets its own
            clones, so an in-place golden cannot leak into it).
        comparators: ``{output_name: comparator}``.  Every output needs exactly one.

    Raises:
        ValueError: empty name, duplicate spec names.
        TypeError: non-spec entries, non-callable golden/impl, comparators not a dict.
    """

    name: str
    inputs: list[Spec]
    golden: CaseFn
    impl: CaseFn
    comparators: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"GoldenCase name must be a non-empty str, got {self.name!r}")
        self.inputs = list(self.inputs)
        check_unique_names(self.inputs)
        if not callable(self.golden) or not callable(self.impl):
            raise TypeError(f"case {self.name!r}: golden and impl must be callable")
        if not isinstance(self.comparators, Mapping):
            raise TypeError(f"case {self.name!r}: comparators must be a dict name -> comparator")
        self.comparators = dict(self.comparators)

    def declared_outputs(self) -> list[str]:
        """Outputs the case needs: ``is_output`` specs, then comparator keys (ordered, unique)."""
        names = [s.name for s in self.inputs if isinstance(s, TensorSpec) and s.is_output]
        return list(dict.fromkeys(names + list(self.comparators)))


@dataclass
class CaseResult:
    """Outcome of :func:`run_case`.

    Attributes:
        name: case name.
        passed: True iff there was at least one output and every output passed.
        outputs: ``{output_name: CompareResult}`` in printing order.
        replayed: inputs/golden were loaded from ``golden_data``.
        error: for :func:`run_cases`, the exception text when the case raised
            (``outputs`` is then empty); otherwise ``None``.
    """

    name: str
    passed: bool
    outputs: dict[str, CompareResult] = field(default_factory=dict)
    replayed: bool = False
    error: Optional[str] = None

    @property
    def failed_outputs(self) -> list[str]:
        """Names of the outputs that failed."""
        return [k for k, r in self.outputs.items() if not r.passed]

    def __bool__(self) -> bool:
        return self.passed


# --------------------------------------------------------------------------- save / load
def case_dir_name(name: str) -> str:
    """Filesystem-safe sub-directory name of a case (``[A-Za-z0-9._-]``, others -> ``_``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return "_" if safe in ("", ".", "..") else safe


def _clone_values(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}


def _for_saving(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone()


def save_case_data(case: GoldenCase, inputs: Mapping[str, Any],
                   golden: Mapping[str, torch.Tensor], directory: PathLike) -> Path:
    """Write ``inputs.safetensors``, ``golden.safetensors`` and ``manifest.json``.

    Scalars are stored as 0-dim tensors (bool / int64 / float64) in
    ``inputs.safetensors`` with their Python type in the file metadata.  The manifest
    records the case name, the spec list (shapes, dtypes, init descriptions), the
    golden output shapes/dtypes, comparator descriptions and the torch version.
    Creates ``directory`` (and parents) if needed; overwrites existing files.

    Returns the directory path.  Raises ``OSError`` on write failure and
    ``TypeError`` for a golden output that is not a tensor.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    scalar_types: dict[str, str] = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = _for_saving(v)
        else:
            scalar_types[k] = type(v).__name__
            dt = {bool: torch.bool, int: torch.int64, float: torch.float64}[type(v)]
            tensors[k] = torch.tensor(v, dtype=dt)
    save_file(tensors, str(d / INPUTS_FILE), metadata={_SCALARS_KEY: json.dumps(scalar_types)})
    gold: dict[str, torch.Tensor] = {}
    for k, v in golden.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"case {case.name!r}: golden output {k!r} is {type(v).__name__}")
        gold[k] = _for_saving(v)
    save_file(gold, str(d / GOLDEN_FILE))
    manifest = {
        "format_version": 1,
        "case": case.name,
        "torch_version": torch.__version__,
        "specs": [s.describe() for s in case.inputs],
        "golden_outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                           for k, v in gold.items()},
        "comparators": {k: _describe_comparator(c) for k, c in case.comparators.items()},
        "files": [INPUTS_FILE, GOLDEN_FILE],
    }
    (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return d


def load_case_data(case: GoldenCase, directory: PathLike
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load frozen ``(inputs, golden)`` for ``case`` from ``directory``.

    Returns the inputs in spec order (tensors and scalar Python values) and every
    golden output stored in the directory.

    Raises:
        GoldenDataError: the directory or a file is missing; a needed input, scalar
            or declared output (``is_output`` spec or comparator key) is absent; a
            frozen tensor's shape/dtype or a scalar's value differs from the spec.
    """
    d = Path(directory)
    for fn in (INPUTS_FILE, GOLDEN_FILE):
        if not (d / fn).is_file():
            raise GoldenDataError(f"case {case.name!r}: golden data {d} lacks {fn}")
    raw: dict[str, torch.Tensor] = {}
    with safe_open(str(d / INPUTS_FILE), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            raw[k] = f.get_tensor(k)
    scalar_types = json.loads(meta.get(_SCALARS_KEY, "{}"))
    casts = {"bool": bool, "int": int, "float": float}
    frozen: dict[str, Any] = {}
    for k, t in raw.items():
        frozen[k] = casts[scalar_types[k]](t.item()) if k in scalar_types else t
    with safe_open(str(d / GOLDEN_FILE), framework="pt") as f:
        golden = {k: f.get_tensor(k) for k in f.keys()}

    src = f"golden data {d}"
    try:
        check_inputs(case.inputs, frozen, src)
    except KeyError as e:
        raise GoldenDataError(f"case {case.name!r}: {e.args[0]}") from None
    except (ValueError, TypeError) as e:
        raise GoldenDataError(f"case {case.name!r}: {e}") from None
    missing = [o for o in case.declared_outputs() if o not in golden]
    if missing:
        raise GoldenDataError(f"case {case.name!r}: {src} lacks golden output(s) {missing}")
    inputs: dict[str, Any] = {}
    for s in case.inputs:
        if isinstance(s, ScalarSpec) or s.is_input:
            inputs[s.name] = frozen[s.name]
    return inputs, golden


def _describe_comparator(c: Any) -> str:
    d = getattr(c, "describe", None)
    if callable(d):
        try:
            return str(d())
        except Exception:  # pragma: no cover - defensive
            pass
    return getattr(c, "__qualname__", None) or repr(c)


# --------------------------------------------------------------------------- running
def _compare_one(comparator: Any, actual: Any, expected: torch.Tensor,
                 context: Mapping[str, Any]) -> CompareResult:
    name = _describe_comparator(comparator)
    try:
        bind = getattr(comparator, "bind", None)
        cmp = bind(context) if callable(bind) else comparator
        res = cmp(actual, expected)
    except Exception as e:  # report, keep evaluating the other outputs
        return CompareResult(False, name, f"comparator raised {type(e).__name__}: {e}")
    if isinstance(res, CompareResult):
        return res
    if isinstance(res, tuple) and len(res) == 2:
        return CompareResult(bool(res[0]), name, str(res[1]))
    if isinstance(res, bool):
        return CompareResult(res, name, "ok" if res else "comparator returned False")
    return CompareResult(False, name, f"comparator returned {type(res).__name__}, "
                                      "expected CompareResult")


def _line(msg: str) -> str:
    return " ".join(str(msg).split())


def run_case(case: GoldenCase, save_data: Optional[PathLike] = None,
             golden_data: Optional[PathLike] = None,
             stream: Optional[TextIO] = None) -> CaseResult:
    """Run one case and print one ``PASS``/``FAIL`` line per output.

    Steps: build inputs from the specs (or, with ``golden_data``, load the frozen
    inputs *and* golden outputs from that directory without calling ``case.golden``);
    compute the golden; optionally save the data (before running impl, so a crashing
    impl still leaves a fixture); run ``case.impl``; compare every output.

    The outputs are the ordered union of ``is_output`` specs, comparator keys, golden
    outputs and impl outputs.  Each becomes a FAIL line -- never an exception -- when
    the golden lacks it, it has no comparator, impl did not return it (or impl
    returned a non-dict), its golden value contradicts its ``is_output`` spec, or the
    comparator raises.  All outputs are evaluated before the result is decided.  A
    case with no outputs at all prints one ``FAIL <case>: ...`` line.

    Args:
        case: the case.
        save_data: directory to write ``inputs.safetensors``, ``golden.safetensors``
            and ``manifest.json`` into (created if needed).
        golden_data: directory previously written by ``save_data``.
        stream: where lines are printed (default ``sys.stdout``).

    Returns:
        :class:`CaseResult`.

    Raises:
        GoldenDataError: ``golden_data`` missing/incomplete/stale (see
            :func:`load_case_data`).
        ValueError, TypeError: input building errors (see :func:`build_inputs`); the
            golden returned a non-dict or a non-tensor value.
        Exception: whatever ``case.golden`` or ``case.impl`` raises propagates.
    """
    out = sys.stdout if stream is None else stream
    replayed = golden_data is not None
    if replayed:
        inputs, golden = load_case_data(case, golden_data)
    else:
        inputs = build_inputs(case.inputs)
        golden = case.golden(_clone_values(inputs))
        if not isinstance(golden, Mapping):
            raise TypeError(f"case {case.name!r}: golden returned {type(golden).__name__}, "
                            "expected a dict name -> tensor")
        golden = dict(golden)
        for k, v in golden.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"case {case.name!r}: golden output {k!r} is "
                                f"{type(v).__name__}, expected torch.Tensor")
    if save_data is not None:
        save_case_data(case, inputs, golden, save_data)

    actual = case.impl(_clone_values(inputs))
    impl_ok = isinstance(actual, Mapping)
    actual_map: Mapping[str, Any] = actual if impl_ok else {}

    out_specs = {s.name: s for s in case.inputs if isinstance(s, TensorSpec) and s.is_output}
    names = list(dict.fromkeys(case.declared_outputs() + list(golden) + list(actual_map)))
    context = {**inputs, **golden}
    results: dict[str, CompareResult] = {}
    for o in names:
        cmp = case.comparators.get(o)
        cname = _describe_comparator(cmp) if cmp is not None else _RUNNER
        spec = out_specs.get(o)
        if o not in golden:
            res = CompareResult(False, cname, "golden produced no such output")
        elif cmp is None:
            res = CompareResult(False, _RUNNER, "no comparator declared for this output")
        elif spec is not None and (tuple(golden[o].shape) != spec.shape
                                   or golden[o].dtype != spec.dtype):
            res = CompareResult(False, cname,
                                f"golden output is {tuple(golden[o].shape)} {golden[o].dtype}, "
                                f"spec says {spec.shape} {spec.dtype}")
        elif not impl_ok:
            res = CompareResult(False, cname, f"impl returned {type(actual).__name__}, "
                                              "expected a dict name -> tensor")
        elif o not in actual_map:
            res = CompareResult(False, cname, "impl did not return this output")
        else:
            res = _compare_one(cmp, actual_map[o], golden[o], context)
        results[o] = res
        print(f"{'PASS' if res.passed else 'FAIL'} {case.name}/{o}: {_line(res.message)}",
              file=out, flush=True)
    if not names:
        print(f"FAIL {case.name}: no outputs to compare (declare comparators)", file=out,
              flush=True)
    passed = bool(names) and all(r.passed for r in results.values())
    return CaseResult(case.name, passed, results, replayed)


def run_cases(cases: Iterable[GoldenCase], save_data: Optional[PathLike] = None,
              golden_data: Optional[PathLike] = None,
              stream: Optional[TextIO] = None) -> list[CaseResult]:
    """Run several cases; save/replay use ``<dir>/<case_dir_name(case.name)>/``.

    An exception inside one case (golden/impl crash, bad golden data) does not stop
    the others: it prints ``ERROR <case>: <ExcType>: <message>`` to ``stream`` (the
    traceback goes to ``sys.stderr``) and yields a failed :class:`CaseResult` with
    ``error`` set.

    Raises:
        ValueError: two cases share a name or a save/replay sub-directory.
    """
    out = sys.stdout if stream is None else stream
    cases = list(cases)
    seen: dict[str, str] = {}
    for c in cases:
        dn = case_dir_name(c.name)
        if dn in seen:
            raise ValueError(f"cases {seen[dn]!r} and {c.name!r} share the name/directory {dn!r}")
        seen[dn] = c.name
    results = []
    for c in cases:
        sd = Path(save_data) / case_dir_name(c.name) if save_data is not None else None
        gd = Path(golden_data) / case_dir_name(c.name) if golden_data is not None else None
        try:
            results.append(run_case(c, save_data=sd, golden_data=gd, stream=out))
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            msg = _line(f"{type(e).__name__}: {e}")
            print(f"ERROR {c.name}: {msg}", file=out, flush=True)
            results.append(CaseResult(c.name, False, {}, gd is not None, msg))
    return results


def main(cases: Sequence[GoldenCase], argv: Optional[Sequence[str]] = None,
         stream: Optional[TextIO] = None) -> int:
    """Command-line entry point for a module of cases.

    Options: ``--save-data DIR`` (freeze inputs + golden, one sub-directory per
    case), ``--golden-data DIR`` (replay them), ``-k SUBSTRING`` (run only cases whose
    name contains it), ``--list`` (print the case names and exit 0).  Prints the
    per-output lines and a final ``N passed, M failed`` summary.

    Typical use at the bottom of a test module::

        if __name__ == "__main__":
            raise SystemExit(main(CASES))

    Returns:
        0 if every selected case passed, 1 otherwise (including when ``-k`` selects
        nothing).  Argument errors exit via ``SystemExit(2)`` from argparse.
    """
    out = sys.stdout if stream is None else stream
    p = argparse.ArgumentParser(description="Run golden cases: PASS/FAIL per output.")
    p.add_argument("--save-data", metavar="DIR", type=Path, default=None,
                   help="freeze inputs and golden outputs under DIR/<case>/")
    p.add_argument("--golden-data", metavar="DIR", type=Path, default=None,
                   help="replay frozen inputs and golden outputs from DIR/<case>/ "
                        "(the golden function is not run)")
    p.add_argument("-k", metavar="SUBSTRING", dest="keyword", default=None,
                   help="only run cases whose name contains SUBSTRING")
    p.add_argument("--list", action="store_true", help="list case names and exit")
    args = p.parse_args(argv)
    selected = [c for c in cases if args.keyword is None or args.keyword in c.name]
    if args.list:
        for c in selected:
            print(c.name, file=out)
        return 0
    if not selected:
        print(f"no case matches -k {args.keyword!r}; 0 passed, 0 failed", file=out)
        return 1
    results = run_cases(selected, save_data=args.save_data, golden_data=args.golden_data,
                        stream=out)
    n_pass = sum(r.passed for r in results)
    n_fail = len(results) - n_pass
    print(f"{n_pass} passed, {n_fail} failed", file=out, flush=True)
    return 0 if n_fail == 0 else 1
