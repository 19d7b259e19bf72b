"""``serve --nproc 2`` (rank 0 serves, the other rank repeats its engine calls,
:mod:`llm_kernels.distributed.mirror`): concurrent greedy completions (texts) equal those of
a one-process server, for a pipeline (Qwen3, PP=2) and for expert shards
(DeepSeek-V4, EP=2); a bad request gets a 400 and the group keeps serving; SIGINT to the
launcher stops every rank with exit code 0. One thread per process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from serve_helpers import write_serve_checkpoint  # noqa: E402

from llm_kernels.distributed.launch import free_port  # noqa: E402

PROMPTS = ["hello world", "the quick brown fox", "a"]


def _start(ckpt: Path, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llm_kernels", "serve", "--checkpoint", str(ckpt), "--port", str(port),
           "--threads", "1", "--max-seq-len", "128", "--dtype", "float32", *extra]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_ready(port: int, proc: subprocess.Popen, log: Path, bound: float = 240) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no server after {bound} s: {log.read_text()[-3000:]}")


def _completions(port: int) -> list[list]:
    body = lambda p: {"model": "m", "prompt": p, "max_tokens": 12, "temperature": 0}  # noqa: E731
    with ThreadPoolExecutor(len(PROMPTS)) as ex:  # concurrent: the scheduler batches them
        res = list(ex.map(lambda p: _post(port, body(p)), PROMPTS))
    assert all(code == 200 for code, _ in res), res
    return [(r["choices"][0]["text"], r["usage"]["completion_tokens"]) for _, r in res]


@pytest.mark.parametrize("preset_name,extra", [("qwen3-mini", ["--nproc", "2"]),  # dense: 2 pipeline stages
                                               ("mini", ["--nproc", "2", "--pp", "1"])])  # 2 expert shards
def test_served_over_ranks_equals_one_process(tmp_path, preset_name, extra):
    ckpt = write_serve_checkpoint(tmp_path / "m", preset_name)
    ports = [free_port(), free_port()]
    logs = [tmp_path / "one.log", tmp_path / "ranks.log"]
    procs = [_start(ckpt, ports[0], [], logs[0]), _start(ckpt, ports[1], extra, logs[1])]
    try:
        for port, proc, log in zip(ports, procs, logs):
            _wait_ready(port, proc, log)
        one, ranks = _completions(ports[0]), _completions(ports[1])
        assert all(n == 12 for _, n in one) and ranks == one
        code, err = _post(ports[1], {"model": "m", "prompt": "x", "max_tokens": 1000})  # past --max-seq-len
        assert code == 400 and "max_tokens" in err["error"]["message"]
        assert _completions(ports[1]) == one  # still serving, same answers
        text = logs[1].read_text()
        assert "over 2 ranks = " in text and "rank 1: " in text
        for proc in procs:
            os.killpg(proc.pid, signal.SIGINT)
        assert [p.wait(timeout=60) for p in procs] == [0, 0], logs[1].read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
