"""Session-wide fixtures of the reference / runtime conformance tests: one model zoo
(``zoo.py``) for every model.

* ``model_zoo``: the session's :class:`zoo.ModelZoo`; each case's random checkpoint is
  written once per session, our weights loaded once per (dtype, quant), the transformers
  model once per (dtype, from_pretrained options).
* ``zoo_case``: parametrised over every case of every model (``zoo.ALL_CASE_IDS``, ids
  ``<model_type>-<name>``), a :class:`zoo.ZooCase` bound to the session zoo.
* ``zoo`` / ``qwen3_zoo``: the DeepSeek-V4 / Qwen3 views (``case(name)``,
  ``checkpoint(name)``, ``ours(name, dtype)``, ``hf(name, dtype, attn=..., experts=...)``).
"""

from __future__ import annotations

import pytest
import transformers
from zoo import ALL_CASE_IDS, ModelZoo, ModelZooView, ZooCase

transformers.logging.set_verbosity_error()


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
