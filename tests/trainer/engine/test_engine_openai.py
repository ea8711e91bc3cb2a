"""The openai engine against a real local OpenAI-compatible HTTP server (aiohttp, in a thread)."""
from __future__ import annotations

import asyncio
import time

import pytest

from branchmerge.api.common import Endpoint, Engine, Sampling
from branchmerge.trainer.engine import API_KEY_ENV, open_engine
from branchmerge.trainer.engine.openai_engine import OpenAIEngine, parse_retry_after
from branchmerge.trainer.errors import InvalidInput, Retryable
from fake_openai import server  # noqa: F401  (fixture)

KEY = "sk-test-very-secret-123"


def _engine(url: str, **endpoint) -> Engine:
    return Engine(name="openai", endpoint=Endpoint(base_url=url, model="teacher", **endpoint))


def _fast(engine: OpenAIEngine) -> OpenAIEngine:
    engine.backoff_base, engine.backoff_cap = 0.01, 0.05
    return engine


def test_generates_in_order_with_key_and_seeds(server, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    sampling = Sampling(temperature=0.6, top_p=0.95, max_tokens=64, seed=3, stop=["</s>"])
    progress = []
    with open_engine(_engine(server.url, max_concurrency=3), None, system_prompt="be brief") as eng:
        out = eng.generate(convs, sampling, n=2, on_progress=lambda d, t: progress.append((d, t)))
    assert [len(c) for c in out] == [2] * 5
    for i, samples in enumerate(out):
        assert all(s.text.startswith(f"echo:q{i}:") for s in samples)
        assert samples[0].finish_reason == "stop" and not samples[0].truncated and samples[0].token_ids is None
        seeds = [int(s.text.rsplit("=", 1)[1]) for s in samples]
        assert seeds[1] == seeds[0] + 1  # one request per sample, consecutive seeds
    assert progress[-1] == (10, 10) and len(progress) == 10
    assert set(server.auth) == {f"Bearer {KEY}"}
    first = server.requests[0]
    assert first["messages"][0] == {"role": "system", "content": "be brief"}
    assert first["stop"] == ["</s>"] and first["n"] == 1 and first["model"] == "teacher"
    assert server.max_in_flight <= 3


def test_same_prompt_same_seed_across_calls(server):
    conv = [[{"role": "user", "content": "same"}]]
    with open_engine(_engine(server.url), None) as eng:
        a = eng.generate(conv, Sampling(seed=1), n=1)[0][0].text
        b = eng.generate(conv + [[{"role": "user", "content": "other"}]], Sampling(seed=1), n=1)[0][0].text
        c = eng.generate(conv, Sampling(seed=2), n=1)[0][0].text
    assert a == b != c


def test_retries_429_and_5xx_honouring_retry_after(server):
    server.fail_plan = [(429, {"Retry-After": "0.3"}), (503, {}), (429, {"Retry-After": "0"})]
    with open_engine(_engine(server.url, max_concurrency=1), None) as eng:
        _fast(eng)
        started = time.monotonic()
        out = eng.generate([[{"role": "user", "content": "x"}]], Sampling(), n=1)
        elapsed = time.monotonic() - started
    assert out[0][0].text.startswith("echo:x:")
    assert eng.retries == 3 and eng.requests_sent == 4
    assert elapsed >= 0.3  # waited as long as the server asked


def test_gives_up_after_max_retries(server, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, KEY)
    server.fail_plan = [(500, {})] * 10
    with open_engine(_engine(server.url, max_retries=2), None) as eng:
        _fast(eng)
        with pytest.raises(Retryable, match="giving up after 3 attempts") as err:
            eng.generate([[{"role": "user", "content": "x"}]], Sampling(), n=1)
    assert KEY not in str(err.value) and KEY not in repr(eng)
    assert len(server.fail_plan) == 7


def test_client_error_is_permanent(server):
    server.status_override = 404
    with open_engine(_engine(server.url), None) as eng:
        with pytest.raises(InvalidInput, match="HTTP 404"):
            eng.generate([[{"role": "user", "content": "x"}]], Sampling(), n=1)


def test_timeout_is_retried(server):
    server.delay = 0.5
    with open_engine(_engine(server.url, timeout_seconds=0.1, max_retries=1), None) as eng:
        _fast(eng)
        with pytest.raises(Retryable, match="TimeoutError"):
            eng.generate([[{"role": "user", "content": "x"}]], Sampling(), n=1)
    server.delay = 0.0


def test_length_finish_and_reasoning_folded(server):
    server.reasoning = True
    with open_engine(_engine(server.url), None) as eng:
        out = eng.generate([[{"role": "user", "content": "2+2"}]], Sampling(max_tokens=2), n=1)[0][0]
    assert out.truncated
    assert out.text.startswith("<think>\n2+2 is 4\n</think>") and out.text.endswith("\\boxed{4}")


def test_called_from_inside_an_event_loop(server):
    async def inside():
        with open_engine(_engine(server.url), None) as eng:
            return eng.generate([[{"role": "user", "content": "loop"}]], Sampling(), n=1)

    assert asyncio.run(inside())[0][0].text.startswith("echo:loop:")


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("1e9") == 300.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_openai_engine_requires_endpoint():
    with pytest.raises(InvalidInput):
        OpenAIEngine(Engine.model_construct(name="openai", endpoint=None))
