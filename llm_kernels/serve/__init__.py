"""OpenAI-compatible server with continuous batching (``python -m llm_kernels serve``).

* :mod:`.scheduler`: the continuous-batching loop on one worker thread owning the engine;
* :mod:`.request`: one request's sampling / detokenization / stop state and its events;
* :mod:`.protocol`: the OpenAI request and response bodies (pydantic) and error bodies;
* :mod:`.app`: the FastAPI routes, SSE streaming and error mapping (400 naming the field);
* :mod:`.launch`: checkpoint folder -> engine + tokenizer -> uvicorn.

The client side benchmark is :mod:`llm_kernels.bench.serve` (``bench-serve``). See
``docs/serving.md``.
"""
