"""Session-wide fixtures of the reference / runtime conformance tests: one model zoo
(``zoo.py``) for every model.

* ``model_zoo``: the session's :class:`zoo.ModelZoo`; each case's random checkpoint is
  written once per session, our weights loaded once per (dtype, quant), the transformers
  model once per (dtype, from_pretrained options).
* ``zoo_case``: parametrised over every case of every model (``zoo.ALL_CASE_IDS``, ids
  ``<model_type>-<name>``), a :class:`zoo.ZooCase` bound to the session zoo.
* ``zoo`` / ``qwen3_zoo``: the DeepSeek-V4 / Qwen3 views (``case(name)``,
  ``checkpoint(name)``, ``ours(name, dtype)``, ``hf(name, dtype, attn=..., experts=...)``).

The report header names the kernel tier this run tests (``kernels/kernel_tiers.py``): e.g.
``llm_kernels kernels: tier avx512-vnni-bf16 (AVX-512F/BW, VNNI, BF16), forced fallback: no,
CPU: AMD EPYC``. The tier skip markers (``needs_cpu`` / ``needs_active``) live in
``kernels/kernel_tiers.py`` too, so that every skip names the tier it needs and this CPU's.
"""

from __future__ import annotations

import pytest
import transformers
from zoo import ALL_CASE_IDS, ModelZoo, ModelZooView, ZooCase

transformers.logging.set_verbosity_error()


def pytest_report_header(config) -> str:
    """``llm_kernels kernels: tier <tier> (<features>), forced fallback: yes|no, CPU: <model>``."""
    return _kernel_tiers().header_line()


def _kernel_tiers():
    """``tests/kernels/kernel_tiers.py`` as module ``kernel_tiers`` (the same module object the
    kernel tests import; loaded by path because ``tests/kernels`` is only on ``sys.path``
    once its conftest is collected)."""
    import importlib.util
    import sys
    from pathlib import Path

    mod = sys.modules.get("kernel_tiers")
    if mod is None:
        spec = importlib.util.spec_from_file_location(
            "kernel_tiers", Path(__file__).resolve().parent / "kernels" / "kernel_tiers.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["kernel_tiers"] = mod
        spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory) -> ModelZoo:
    return ModelZoo(tmp_path_factory)


@pytest.fixture(scope="session", params=ALL_CASE_IDS, ids=[f"{mt}-{n}" for mt, n in ALL_CASE_IDS])
def zoo_case(request, model_zoo) -> ZooCase:
    model_type, name = request.param
    return ZooCase(model_type, name, model_zoo)


@pytest.fixture(scope="session")
def zoo(model_zoo) -> ModelZooView:
    """DeepSeek-V4 cases (``zoo.CASES``)."""
    return model_zoo.for_model("deepseek_v4")


@pytest.fixture(scope="session")
def qwen3_zoo(model_zoo) -> ModelZooView:
    """Qwen3 cases (``zoo.Q3_CASES``)."""
    return model_zoo.for_model("qwen3")
