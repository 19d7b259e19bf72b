"""The server is model-neutral: a DeepSeek-V4 ``mini`` random checkpoint served the same
way (per-sequence caches instead of Qwen3's page pool), concurrent greedy streams equal
to the same requests run alone, every sequence released afterwards."""

from __future__ import annotations

import asyncio

import openai
import pytest
from serve_helpers import run_uvicorn, write_serve_checkpoint

NAME = "dsv4mini"


@pytest.fixture(scope="module")
def ds_server(tmp_path_factory):
    from llm_kernels.serve.launch import load_server

    out = write_serve_checkpoint(tmp_path_factory.mktemp("ds") / NAME, "mini")
    app, engine, tok, _ = load_server(out, backend="fused", max_batch=4, max_queue=8, max_seq_len=128)
    with run_uvicorn(app) as url:
        yield url, engine


def test_deepseek_concurrent_streams_equal_alone(ds_server):
    url, engine = ds_server

    async def one(client, i):
        ids, reason = [], None
        stream = await client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"Hello number {i} " * (1 + i)}],
            max_tokens=8 + 4 * i, temperature=0, stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        async for ch in stream:
            if ch.choices:
                ids += ch.choices[0].model_extra.get("token_ids") or []
                reason = ch.choices[0].finish_reason or reason
        return ids, reason

    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
            alone = [await one(c, i) for i in range(6)]
            together = await asyncio.gather(*[one(c, i) for i in range(6)])
            return alone, together

    alone, together = asyncio.run(run())
    for i, ((ids_a, _), (ids_t, reason)) in enumerate(zip(alone, together)):
        assert reason == "length" and len(ids_t) == 8 + 4 * i
        assert ids_t == ids_a, f"request {i}"
    assert engine.seqs == {}  # DeepSeek-V4's per-sequence caches all released
