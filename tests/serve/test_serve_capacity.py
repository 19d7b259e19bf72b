"""Capacity: a cancelled or disconnected request frees its cache at once (streaming,
non-streaming, and while still queued); with ``max_batch`` running and ``max_queue``
waiting, a new request gets a 503 naming the limits, and is served once room frees up."""

from __future__ import annotations

import threading
import time

import httpx
import openai
from conftest import MODEL
from serve_helpers import EngineProxy, live_sequences, wait_until

LONG = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 200, "temperature": 0, "ignore_eos": True}


def _slow(engine, seconds=0.02):
    return EngineProxy(engine, before_step=lambda ids, toks: time.sleep(seconds))


def _stats(url):
    return httpx.get(url + "/stats").json()


def test_stream_disconnect_frees_cache(serve_app, loaded):
    engine = loaded[1]
    free0 = engine.cache.free_blocks
    with serve_app(engine=_slow(engine)) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(stream=True, **{k: v for k, v in LONG.items() if k != "ignore_eos"},
                                           extra_body={"ignore_eos": True})
        got = [next(iter(stream)) for _ in range(3)]
        assert all(c.choices for c in got)
        assert live_sequences(engine) == 1 and engine.cache.free_blocks < free0
        stream.close()  # the client goes away mid-stream
        wait_until(lambda: live_sequences(engine) == 0, timeout=5, what="the sequence released")
        assert engine.cache.free_blocks == free0
        st = _stats(url)
        assert st["requests_cancelled"] == 1 and st["running"] == 0
        assert st["tokens"] < 200  # it stopped generating


def test_non_streaming_disconnect_frees_cache(serve_app, loaded):
    engine = loaded[1]
    with serve_app(engine=_slow(engine)) as (url, app):
        try:
            httpx.post(url + "/v1/completions", json=LONG, timeout=0.5)
            raise AssertionError("the slow request should have timed out on the client")
        except httpx.TimeoutException:
            pass
        wait_until(lambda: _stats(url)["requests_cancelled"] == 1, timeout=5, what="the request cancelled")
        wait_until(lambda: live_sequences(engine) == 0, timeout=5, what="the sequence released")
        assert _stats(url)["tokens"] < 200


def test_full_queue_is_503_then_served(serve_app, loaded):
    engine = loaded[1]
    with serve_app(engine=_slow(engine), max_batch=1, max_queue=1) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        body = {k: v for k, v in LONG.items() if k != "ignore_eos"}
        running = client.completions.create(stream=True, **body, extra_body={"ignore_eos": True})
        next(iter(running))  # A runs
        out = {}

        def waiter():  # B waits for A's slot
            out["b"] = httpx.post(url + "/v1/completions", json={**GOOD_SHORT}, timeout=60)

        th = threading.Thread(target=waiter)
        th.start()
        wait_until(lambda: _stats(url)["waiting"] == 1, what="B queued")
        r = httpx.post(url + "/v1/completions", json=GOOD_SHORT)  # C: no room
        assert r.status_code == 503
        err = r.json()["error"]
        assert "--max-batch 1" in err["message"] and "--max-queue 1" in err["message"]
        assert r.headers.get("retry-after") == "1"
        with_client = None
        try:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
        except openai.APIStatusError as e:
            with_client = e.status_code
        assert with_client == 503
        running.close()  # A leaves: B is admitted and served
        th.join(30)
        assert out["b"].status_code == 200 and out["b"].json()["usage"]["completion_tokens"] == 3
        assert httpx.post(url + "/v1/completions", json=GOOD_SHORT).status_code == 200
        assert _stats(url)["rejected_full"] == 2
        wait_until(lambda: live_sequences(engine) == 0, what="all sequences released")


def test_queued_request_cancelled_leaves_queue(serve_app, loaded):
    engine = loaded[1]
    with serve_app(engine=_slow(engine), max_batch=1, max_queue=4) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        body = {k: v for k, v in LONG.items() if k != "ignore_eos"}
        a = client.completions.create(stream=True, **body, extra_body={"ignore_eos": True})
        next(iter(a))
        b = client.completions.create(stream=True, **body, extra_body={"ignore_eos": True})
        wait_until(lambda: _stats(url)["waiting"] == 1, what="B queued")
        b.close()  # B's client leaves while B waits
        wait_until(lambda: _stats(url)["waiting"] == 0, timeout=5, what="B out of the queue")
        assert _stats(url)["running"] == 1 and live_sequences(engine) == 1
        a.close()
        wait_until(lambda: live_sequences(engine) == 0, timeout=5, what="A released")
        assert _stats(url)["requests_cancelled"] == 2


GOOD_SHORT = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
