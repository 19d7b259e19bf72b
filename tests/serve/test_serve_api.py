"""The server's happy path through the official ``openai`` client: /v1/models, /health,
completions and chat completions, streaming and not, usage counts, stop strings, EOS."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import MAX_SEQ_LEN, MODEL


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(**kw):
    return dict(model=MODEL, temperature=0.0, **kw)


def test_models_and_health(server, client):
    url, _ = server
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == MAX_SEQ_LEN
    h = httpx.get(url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_completion_non_streaming_and_streaming_agree(loaded, client):
    tok = loaded[2]
    prompt = "The quick brown fox"
    r = client.completions.create(prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True,
                                                                            "return_token_ids": True}, **_greedy())
    ch = r.choices[0]
    assert ch.finish_reason == "length"
    ids = ch.model_extra["token_ids"]
    assert len(ids) == 12
    assert ch.text == tok.decode(ids)
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12

    chunks = list(client.completions.create(prompt=prompt, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}, **_greedy()))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ch.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len([c for c in chunks if c.choices]) >= 2  # streamed, not one blob


def test_completion_from_token_ids(client):
    r = client.completions.create(prompt=[5, 6, 7, 8], max_tokens=3, extra_body={"ignore_eos": True}, **_greedy())
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3


def test_chat_non_streaming_and_streaming_agree(loaded, client):
    tok = loaded[2]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, 世界!"}]
    r = client.chat.completions.create(messages=msgs, max_tokens=10, extra_body={"ignore_eos": True}, **_greedy())
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode_chat(msgs)) and r.usage.completion_tokens == 10

    stream = client.chat.completions.create(messages=msgs, max_tokens=10, stream=True,
                                            extra_body={"ignore_eos": True}, **_greedy())
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1


def test_stop_string_and_eos(loaded, client):
    tok = loaded[2]
    base = client.completions.create(prompt="Hello", max_tokens=24, extra_body={"ignore_eos": True,
                                                                               "return_token_ids": True},
                                     **_greedy())
    text = base.choices[0].text
    # a stop string: the first 2-character piece of the text (from index 3 on) not seen earlier
    p = next(i for i in range(3, len(text) - 1) if text.find(text[i:i + 2]) == i)
    r = client.completions.create(prompt="Hello", max_tokens=24, stop=[text[p:p + 2]],
                                  extra_body={"ignore_eos": True}, **_greedy())
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:p]  # the stop string itself is not emitted
    # a stop token id: the 3rd generated token ends the request, its text is not emitted
    ids = base.choices[0].model_extra["token_ids"]
    r = client.completions.create(prompt="Hello", max_tokens=24,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [ids[2]]}, **_greedy())
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == ids.index(ids[2]) + 1
    assert r.choices[0].text == tok.decode(ids[:ids.index(ids[2])])


def test_seeded_sampling_reproducible(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.9,
              extra_body={"ignore_eos": True, "top_k": 50, "return_token_ids": True})
    a = client.completions.create(seed=1234, **kw).choices[0].model_extra["token_ids"]
    b = client.completions.create(seed=1234, **kw).choices[0].model_extra["token_ids"]
    c = client.completions.create(seed=99, **kw).choices[0].model_extra["token_ids"]
    assert a == b
    assert a != c


def test_bench_serve_against_the_server(server, tmp_path):
    """``bench-serve`` drives the server with concurrent streams and reports consistent figures."""
    import json

    from llm_kernels.cli import main

    url, _ = server
    out = tmp_path / "bs.json"
    assert main(["bench-serve", "--url", url + "/v1", "--concurrency", "1,3", "--requests", "2",
                 "--prompt-tokens", "5", "--max-tokens", "6", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    by_c = {r["concurrency"]: r for r in res["runs"]}
    assert set(by_c) == {1, 3}
    for c, r in by_c.items():
        assert r["requests"] == 2 * c and r["output_tokens"] == 2 * c * 6
        assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p90"] <= r["ttft_ms"]["p99"]
        assert r["itl_ms"]["p50"] > 0 and len(r["itl_ms"]) == 3
        assert r["server"]["tokens"] == 2 * c * 6 and r["server"]["prefill_tokens"] == 2 * c * 5
        assert r["server"]["http_cpu_ms_per_step"] > 0 and r["server"]["loop_share_of_engine"] > 0
    assert by_c[1]["server"]["decode_steps"] == 2 * 5  # 6 tokens: 1 from the prefill, 5 decode steps
    assert by_c[3]["server"]["mean_decode_batch"] > 1  # the three streams shared decode steps
    assert main(["bench-serve", "--url", url, "--concurrency", "0"]) == 2
    out2 = tmp_path / "bs2.json"  # the 'bench --serve URL' spelling
    assert main(["bench", "--serve", url, "--concurrency", "2", "--requests", "1", "--prompt-tokens", "3",
                 "--max-tokens", "2", "--json", str(out2)]) == 0
    assert json.loads(out2.read_text())["runs"][0]["output_tokens"] == 4
