"""Continuous batching: 16 concurrent streaming greedy chat requests of different prompt and
completion lengths (8 run at a time, the rest wait and join as others finish) each produce
exactly the tokens the same request produces alone."""

from __future__ import annotations

import asyncio

import httpx
import openai
from conftest import MAX_BATCH, MODEL
from serve_helpers import live_sequences, wait_until

N = 16


def _request(i: int) -> dict:
    words = " ".join(["tea", "river", "stone", "cloud", "lamp", "song"][: 1 + i % 6])
    return dict(model=MODEL, temperature=0.0, max_tokens=6 + 3 * i,
                messages=[{"role": "user", "content": f"Request {i}: {words} " * (1 + i % 4)}],
                extra_body={"ignore_eos": True, "return_token_ids": True})


async def _stream_ids(client: openai.AsyncOpenAI, i: int) -> tuple[list[int], str, str]:
    ids, text, reason = [], [], None
    stream = await client.chat.completions.create(stream=True, **_request(i))
    async for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        ids += c.model_extra.get("token_ids") or []
        text.append(c.delta.content or "")
        reason = c.finish_reason or reason
    return ids, "".join(text), reason


def test_concurrent_streams_equal_alone(server, loaded):
    url, app = server
    engine, tok = loaded[1], loaded[2]

    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            alone = [await _stream_ids(client, i) for i in range(N)]
            s0 = httpx.get(url + "/stats").json()
            together = await asyncio.gather(*[_stream_ids(client, i) for i in range(N)])
            s1 = httpx.get(url + "/stats").json()
            return alone, together, s0, s1

    alone, together, s0, s1 = asyncio.run(run())
    for i in range(N):
        ids, text, reason = together[i]
        assert reason == "length"
        assert len(ids) == _request(i)["max_tokens"]
        assert ids == alone[i][0], f"request {i}: batched tokens differ from the request run alone"
        assert text == alone[i][1] == tok.decode(ids)
    steps = s1["steps"] - s0["steps"]
    mean_batch = (s1["batch_sum"] - s0["batch_sum"]) / steps
    # 16 requests of 6..51 tokens, 8 at a time: far fewer steps than one request after another
    assert mean_batch > MAX_BATCH / 2, mean_batch
    assert steps < sum(_request(i)["max_tokens"] for i in range(N)) / 3
    wait_until(lambda: live_sequences(engine) == 0, what="every sequence released")
