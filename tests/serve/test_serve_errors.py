"""Bad requests get a 400 whose ``error.param`` names the field (never FastAPI's 422), an
engine exception fails only its own request (500 / an error event mid-stream), and the
server keeps serving after each."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from conftest import MAX_SEQ_LEN, MODEL
from serve_helpers import EngineProxy, live_sequences, wait_until

GOOD = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}

# (endpoint, body or raw bytes, the field named)
BAD = [
    ("completions", b'{"model": "q3serve", "prompt": "Hi",', "body"),
    ("completions", b"[1, 2]", "body"),
    ("completions", b"", "body"),
    ("completions", {**GOOD, "model": "gpt-4"}, "model"),
    ("chat/completions", {**CHAT, "model": "nope"}, "model"),
    ("completions", {**GOOD, "max_tokens": -5}, "max_tokens"),
    ("completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("completions", {**GOOD, "max_tokens": "many"}, "max_tokens"),
    ("completions", {**GOOD, "temperature": -0.5}, "temperature"),
    ("completions", {**GOOD, "temperature": 7}, "temperature"),
    ("completions", {**GOOD, "top_p": 0}, "top_p"),
    ("completions", {**GOOD, "seed": -1}, "seed"),
    ("completions", {**GOOD, "repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {**GOOD, "stop_token_ids": [10 ** 6]}, "stop_token_ids"),
    ("completions", {**GOOD, "stop": ["ok", ""]}, "stop"),
    ("completions", {**GOOD, "n": 2}, "n"),
    ("completions", {**GOOD, "max_tokenz": 3}, "max_tokenz"),
    ("completions", {**GOOD, "prompt": ""}, "prompt"),
    ("completions", {**GOOD, "prompt": ["a", "b"]}, "prompt"),
    ("completions", {**GOOD, "prompt": [1, 2, 10 ** 6]}, "prompt"),
    ("completions", {k: v for k, v in GOOD.items() if k != "prompt"}, "prompt"),
    ("completions", {**GOOD, "max_tokens": MAX_SEQ_LEN}, "max_tokens"),  # context too long
    ("completions", {**GOOD, "prompt": list(range(1, MAX_SEQ_LEN + 1))}, "prompt"),
    ("chat/completions", {**CHAT, "max_tokens": MAX_SEQ_LEN}, "max_tokens"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x " * MAX_SEQ_LEN}]}, "messages"),
    ("chat/completions", {**CHAT, "messages": []}, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a"},
                                               {"role": "system", "content": "late"}]}, "messages"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {**CHAT, "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
]


def _post(url: str, endpoint: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{url}/v1/{endpoint}", content=body, headers={"content-type": "application/json"})
    return httpx.post(f"{url}/v1/{endpoint}", json=body, timeout=60)


@pytest.mark.parametrize("endpoint,body,field", BAD, ids=[f"{e}-{f}-{i}" for i, (e, _, f) in enumerate(BAD)])
def test_bad_request_is_400_naming_the_field(server, endpoint, body, field):
    url, _ = server
    r = _post(url, endpoint, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field, err
    assert field in err["message"], err
    assert err["type"] == "invalid_request_error"
    good = _post(url, "completions", GOOD)  # and the server still serves
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_sees_bad_request(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=-1)
    assert e.value.status_code == 400 and e.value.param == "max_tokens"


def test_unknown_route_is_an_openai_error(server):
    url, _ = server
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


POISON = 499  # a prompt starting with this id makes the proxy engine fail that sequence's 3rd step


class _PoisonEngine(EngineProxy):
    """Fails any step that holds a poisoned sequence once it has 2 generated tokens (so
    the failure hits a batched decode step, which the scheduler then retries per request)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.bad: set[int] = set()
        self.plen: dict[int, int] = {}

    def step(self, seq_ids, tokens, logits_rows="all"):
        for s, t in zip(seq_ids, tokens):
            if t[0] == POISON and len(t) > 1:
                self.bad.add(s)
                self.plen[s] = len(t)
        if any(s in self.bad and self._engine.length(s) >= self.plen[s] + 1 for s in seq_ids):
            raise RuntimeError("injected engine failure")
        return self._engine.step(seq_ids, tokens, logits_rows=logits_rows)


def test_engine_failure_fails_only_its_request(serve_app, loaded):
    engine = loaded[1]
    proxy = _PoisonEngine(engine)
    with serve_app(engine=proxy) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = {}

        def good():
            out["good"] = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=40, temperature=0,
                                                    extra_body={"ignore_eos": True})

        th = threading.Thread(target=good)
        th.start()
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt=[POISON, 6, 7], max_tokens=40,
                                      extra_body={"ignore_eos": True})
        assert "injected engine failure" in str(e.value)
        with pytest.raises(openai.APIError, match="injected engine failure"):  # streaming: an error event
            _poisoned_stream(client)
        th.join(60)
        assert out["good"].usage.completion_tokens == 40  # the concurrent good request finished
        st = httpx.get(url + "/stats").json()
        assert st["requests_failed"] == 2 and st["alive"]
        assert httpx.get(url + "/health").status_code == 200
        wait_until(lambda: live_sequences(engine) == 0, what="failed requests' sequences released")


def _poisoned_stream(client):
    stream = client.completions.create(model=MODEL, prompt=[POISON, 8, 9], max_tokens=40, stream=True,
                                       extra_body={"ignore_eos": True})
    for _ in stream:
        pass


@pytest.mark.parametrize("argv,msg", [
    (["serve", "--checkpoint", "/nonexistent/model"], "not a directory"),
    (["serve", "--checkpoint", "{ckpt}", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["serve", "--checkpoint", "{ckpt}", "--max-queue", "-1"], "--max-queue must be >= 0"),
    (["serve", "--checkpoint", "{ckpt}", "--port", "70000"], "--port must be in"),
    (["serve", "--checkpoint", "{bare}"], "tokenizer.json: missing"),
    (["bench-serve", "--url", "http://127.0.0.1:1"], "no OpenAI-compatible server"),
    (["bench-serve", "--concurrency", "1,x"], "--concurrency"),
])
def test_cli_errors_name_the_flag(argv, msg, serve_ckpt, tmp_path, capsys):
    """``serve`` / ``bench-serve`` refuse bad flags with exit 2 and a message naming them,
    before loading any weights."""
    from llm_kernels.cli import main

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((serve_ckpt / "config.json").read_text())
    argv = [a.format(ckpt=serve_ckpt, bare=bare) for a in argv]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
