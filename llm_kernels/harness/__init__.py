"""Golden harness: declare a kernel's inputs, a golden reference and comparators,
then run, compare, and save/replay frozen fixtures.

Quick start::

    from llm_kernels.harness import TensorSpec, Normal, GoldenCase, AllClose, main

    case = GoldenCase(
        name="add",
        inputs=[TensorSpec("x", (4, 8), torch.float32, Normal(seed=0)),
                TensorSpec("y", (4, 8), torch.float32, Normal(seed=1))],
        golden=lambda v: {"out": v["x"] + v["y"]},
        impl=lambda v: {"out": my_add(v["x"], v["y"])},
        comparators={"out": AllClose(rtol=1e-6, atol=1e-6)},
    )
    raise SystemExit(main([case]))

See ``docs/harness.md``.
"""

from .compare import (
    AllClose,
    Comparator,
    CompareResult,
    CosineAtLeast,
    ErrorReport,
    RatioAllClose,
    TopKTieAware,
    error_report,
)
from .runner import (
    CaseResult,
    GoldenCase,
    GoldenDataError,
    case_dir_name,
    load_case_data,
    main,
    run_case,
    run_cases,
    save_case_data,
)
from .spec import (
    Full,
    Init,
    Normal,
    Ones,
    RandInt,
    ScalarSpec,
    TensorSpec,
    Uniform,
    Zeros,
    build_inputs,
    describe_init,
)

__all__ = [
    # spec
    "TensorSpec", "ScalarSpec", "Init", "Zeros", "Ones", "Full", "Normal", "Uniform",
    "RandInt", "build_inputs", "describe_init",
    # compare
    "CompareResult", "Comparator", "AllClose", "RatioAllClose", "CosineAtLeast",
    "TopKTieAware", "ErrorReport", "error_report",
    # runner
    "GoldenCase", "CaseResult", "GoldenDataError", "run_case", "run_cases", "main",
    "save_case_data", "load_case_data", "case_dir_name",
]
