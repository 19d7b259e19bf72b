"""Helpers of the server tests: uvicorn in a thread, an engine proxy that can slow down or
fail steps, the engine's live sequence count, polling."""

from __future__ import annotations

import contextlib
import threading
import time


def write_serve_checkpoint(out, preset_name: str):
    """A seeded random ``preset_name`` checkpoint in ``out`` with the random tokenizer files."""
    from llm_kernels.checkpoint import write_random_checkpoint
    from llm_kernels.checkpoint.random_tokenizer import write_random_tokenizer
    from llm_kernels.models import preset

    cfg = preset(preset_name)
    write_random_checkpoint(cfg, out, seed=0, progress=False)
    if not (out / "tokenizer.json").is_file():
        write_random_tokenizer(out, cfg.vocab_size)
    return out


@contextlib.contextmanager
def run_uvicorn(app):
    """Serve ``app`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not server.started:
        if not th.is_alive() or time.monotonic() - t0 > 30:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(30)


class EngineProxy:
    """Delegates to a real engine; ``before_step(seq_ids, tokens)`` runs before each step
    (sleep to slow it down, raise to make it fail)."""

    def __init__(self, engine, before_step=None):
        self._engine, self.before_step = engine, before_step

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self, seq_ids, tokens, logits_rows="all"):
        if self.before_step is not None:
            self.before_step(seq_ids, tokens)
        return self._engine.step(seq_ids, tokens, logits_rows=logits_rows)


def live_sequences(engine) -> int:
    """Sequences the engine's cache holds (Qwen3's paged cache: registered sequences)."""
    return len(engine.cache.tables)


def wait_until(pred, timeout=10.0, what="condition"):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
