"""Fixtures of the server tests: one tiny random Qwen3 checkpoint with a tokenizer, its
engine loaded once (fused kernels, cache for ``MAX_BATCH`` sequences of ``MAX_SEQ_LEN``
tokens), and apps on it served by uvicorn on 127.0.0.1 with a free port.

``serve_app(engine=..., max_batch=..., max_queue=...)`` starts an app over the shared (or a
wrapped) engine and yields its base URL; the app (and its scheduler thread) stops on exit,
so apps never share the engine at the same time.
"""

from __future__ import annotations

import contextlib

import pytest
from serve_helpers import run_uvicorn, write_serve_checkpoint

MAX_BATCH = 8
MAX_SEQ_LEN = 256
MODEL = "q3serve"


@pytest.fixture(scope="session")
def serve_ckpt(tmp_path_factory):
    """A seeded random qwen3-mini checkpoint with the random tokenizer files."""
    return write_serve_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL, "qwen3-mini")


@pytest.fixture(scope="session")
def loaded(serve_ckpt):
    """(app, engine, tokenizer, ServeConfig) of the checkpoint, loaded and warmed up once."""
    from llm_kernels.serve.launch import load_server

    return load_server(serve_ckpt, backend="fused", max_batch=MAX_BATCH, max_queue=32, max_seq_len=MAX_SEQ_LEN)


def _make_app(loaded, engine=None, max_batch=MAX_BATCH, max_queue=32):
    from llm_kernels.serve.app import ServeConfig, create_app

    _, engine0, tok, cfg0 = loaded
    cfg = ServeConfig(model_name=MODEL, checkpoint=cfg0.checkpoint, max_batch=max_batch, max_queue=max_queue,
                      max_seq_len=MAX_SEQ_LEN)
    return create_app(engine or engine0, tok, cfg)


@pytest.fixture
def serve_app(loaded):
    """Factory: ``with serve_app(engine=None, max_batch=MAX_BATCH, max_queue=32) as (url, app): ...``
    (a fresh app over the shared engine, or over ``engine``, e.g. an :class:`EngineProxy`)."""

    @contextlib.contextmanager
    def make(engine=None, max_batch=MAX_BATCH, max_queue=32):
        app = _make_app(loaded, engine, max_batch, max_queue)
        with run_uvicorn(app) as url:
            yield url, app

    return make


@pytest.fixture(scope="module")
def server(loaded):
    """A fresh app over the shared engine, served for a whole module: (base URL, app). A
    module uses either this or ``serve_app``, never both (one scheduler per engine at a time)."""
    app = _make_app(loaded)
    with run_uvicorn(app) as url:
        yield url, app
