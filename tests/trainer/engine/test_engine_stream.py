"""``generate_iter``: each prompt's completions as soon as they are all done, a bounded window in flight, the
same completions as ``generate`` (openai engine on the local server; offline vLLM on the tiny model)."""
from __future__ import annotations

import threading
import time

import pytest

from branchmerge.api.common import Endpoint, Engine, Sampling
from branchmerge.trainer.engine import open_engine
from branchmerge.trainer.errors import Retryable


def _engine(url: str, **endpoint) -> Engine:
    return Engine(name="openai", endpoint=Endpoint(base_url=url, model="teacher", **endpoint))


def _convs(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"q{i}"}] for i in range(count)]


def test_openai_stream_gives_generate_s_completions_and_a_slow_prompt_last(server):
    server.hold = lambda body: body["messages"][-1]["content"] == "q0"
    sampling = Sampling(seed=4)
    with open_engine(_engine(server.url, max_concurrency=4), None) as eng:
        order, got = [], {}
        for item in eng.generate_iter(_convs(8), sampling, n=2, tick=0.05):
            if item is None:  # only q0 left: release it
                server.released.set()
                continue
            i, completions = item
            order.append(i)
            got[i] = [c.text for c in completions]
        server.released.set()
        want = eng.generate(_convs(8), sampling, n=2)
    assert order[-1] == 0 and sorted(order) == list(range(8))  # q0 did not hold the seven others back
    assert got == {i: [c.text for c in cs] for i, cs in enumerate(want)}


def test_openai_stream_keeps_a_bounded_window(server):
    server.delay = 0.05
    with open_engine(_engine(server.url, max_concurrency=8), None) as eng:
        assert eng.default_window(2) == 8 and eng.default_window(32) == 1
        done = [i for i, _ in eng.generate_iter(_convs(10), Sampling(), n=1, window=2)]
    assert sorted(done) == list(range(10))
    assert server.max_in_flight <= 2  # 10 prompts, 8 connections: the window of 2 prompts holds


def test_openai_stream_closed_early_stops_its_requests(server):
    server.hold = lambda body: True
    with open_engine(_engine(server.url, max_concurrency=2), None) as eng:
        stream = eng.generate_iter(_convs(6), Sampling(), n=1, tick=0.05)
        assert next(stream) is None  # nothing finished: a tick
        started = time.monotonic()
        stream.close()  # the caller failed: the request thread ends, nothing is left running
        assert time.monotonic() - started < 5
    assert not [t for t in threading.enumerate() if t.name == "openai-engine"]
    assert len(server.requests) == 0


def test_openai_stream_raises_the_engine_error_in_the_caller(server):
    server.fail_plan = [(503, {})] * 10
    with open_engine(_engine(server.url, max_concurrency=1, max_retries=1), None) as eng:
        eng.backoff_base, eng.backoff_cap = 0.01, 0.02
        with pytest.raises(Retryable):
            list(eng.generate_iter(_convs(2), Sampling(), n=1))


@pytest.mark.slow
def test_vllm_stream_matches_generate_within_its_window(tiny_vllm):
    convs = [[{"role": "user", "content": f"count to {i}"}] for i in range(7)]
    sampling = Sampling(temperature=0.9, top_p=0.9, max_tokens=16, seed=11)
    want = tiny_vllm.generate(convs, sampling, n=3)
    engine = tiny_vllm.llm.llm_engine
    got, in_flight = {}, []
    for i, completions in tiny_vllm.generate_iter(convs, sampling, n=3, window=2):
        got[i] = completions
        in_flight.append(engine.get_num_unfinished_requests())
    assert max(in_flight) <= 2 * 3  # window 2 prompts x n=3 sequences
    assert sorted(got) == list(range(7))
    for i, completions in got.items():
        assert [c.token_ids for c in completions] == [c.token_ids for c in want[i]]
        assert [c.text for c in completions] == [c.text for c in want[i]]
    assert engine.get_num_unfinished_requests() == 0
    assert tiny_vllm.default_window(3) >= 1
