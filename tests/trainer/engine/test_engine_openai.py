"""The openai engine against a real local OpenAI-compatible HTTP server (aiohttp, in a thread)."""
from __future__ import annotations

import asyncio
import time

import pytest

from branchmerge.api.common import API_KEY_ENV, Endpoint, Engine, Sampling
from branchmerge.trainer.engine import open_engine
from branchmerge.trainer.engine.openai_engine import OpenAIEngine, parse_retry_after
from branchmerge.trainer.errors import InvalidInput, Retryable

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


# ---- streaming -----------------------------------------------------------------------------------------
LONG = "a trace that takes longer to stream than the idle timeout allows for a whole request"


def test_a_slow_stream_outlasts_the_idle_timeout(server):
    """Tokens keep coming for ~1.5 s with a 0.4 s idle timeout: one request, never retried."""
    server.answer = lambda body: LONG
    server.chunk_chars, server.chunk_delay = 2, 0.035
    with open_engine(_engine(server.url, timeout_seconds=0.4, max_retries=0), None) as eng:
        started = time.monotonic()
        out = eng.generate([[{"role": "user", "content": "slow"}]], Sampling(), n=1)[0][0]
        elapsed = time.monotonic() - started
    assert elapsed > 1.0  # far beyond timeout_seconds in total
    assert out.text == LONG and out.finish_reason == "stop" and not out.rejected
    assert out.num_tokens == 1  # the usage chunk (stream_options.include_usage)
    assert eng.requests_sent == 1 and eng.retries == 0
    body = server.requests[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_without_streaming_the_timeout_bounds_the_whole_request(server):
    server.answer = lambda body: LONG
    with open_engine(_engine(server.url, stream=False), None) as eng:
        out = eng.generate([[{"role": "user", "content": "whole"}]], Sampling(), n=1)[0][0]
    assert out.text == LONG and "stream" not in server.requests[0]
    server.delay = 0.5  # no answer within the whole-request timeout: retried, then given up
    with open_engine(_engine(server.url, stream=False, timeout_seconds=0.2, max_retries=1), None) as eng:
        _fast(eng)
        with pytest.raises(Retryable, match="TimeoutError"):
            eng.generate([[{"role": "user", "content": "x"}]], Sampling(), n=1)
    server.delay = 0.0


def test_a_stalled_stream_is_retried_from_scratch(server):
    server.stall_plan = [1.5]  # the first attempt goes silent after its first event
    with open_engine(_engine(server.url, timeout_seconds=0.3, max_retries=2), None) as eng:
        _fast(eng)
        out = eng.generate([[{"role": "user", "content": "stuck"}]], Sampling(), n=1)[0][0]
    assert out.text.startswith("echo:stuck:")
    assert eng.requests_sent == 2 and eng.retries == 1


def test_a_stream_that_stays_stalled_gives_up_retryable(server):
    server.stall_plan = [1.0, 1.0]
    with open_engine(_engine(server.url, timeout_seconds=0.2, max_retries=1), None) as eng:
        _fast(eng)
        with pytest.raises(Retryable, match="no data for 0.2 s"):
            eng.generate([[{"role": "user", "content": "x"}]], Sampling(), n=1)


def test_streamed_reasoning_is_folded_as_a_whole_message_is(server):
    server.chunk_chars = 1  # every delta one character: nothing may depend on chunk boundaries
    for field in ("reasoning_content", "reasoning"):
        server.message = lambda body, f=field: {"role": "assistant", "content": "\n\nso \\boxed{4}", f: "2 + 2 = 4."}
        outs = []
        for stream in (True, False):
            with open_engine(_engine(server.url, stream=stream), None) as eng:
                outs.append(eng.generate([[{"role": "user", "content": "2+2"}]], Sampling(max_tokens=2), n=1)[0][0])
        assert outs[0] == outs[1]
        assert outs[0].text == "<think>\n2 + 2 = 4.\n</think>\n\nso \\boxed{4}" and outs[0].truncated


def test_a_json_answer_to_a_streaming_request_is_read(server):
    """Servers that ignore ``stream`` answer with one chat.completion: taken as it is."""
    server.ignore_stream = True
    with open_engine(_engine(server.url), None) as eng:
        out = eng.generate([[{"role": "user", "content": "plain"}]], Sampling(), n=1)[0][0]
    assert out.text.startswith("echo:plain:") and server.requests[0]["stream"] is True


# ---- refusals: one sample rejected, or the whole endpoint wrong -----------------------------------------
def _users(*contents: str) -> list[list[dict]]:
    return [[{"role": "user", "content": c}] for c in contents]


def test_a_400_rejects_only_that_sample(server):
    why = "Input contains a forbidden phrase. " + "x" * 1000
    server.refuse = lambda body: (400, why) if body["messages"][-1]["content"] == "bad" else None
    progress = []
    with open_engine(_engine(server.url, max_concurrency=2), None) as eng:
        out = eng.generate(_users("ok1", "bad", "ok2"), Sampling(), n=2, on_progress=lambda d, t: progress.append(d))
    assert [[s.rejected for s in samples] for samples in out] == [[None, None], ["http_400"] * 2, [None, None]]
    bad = out[1][0]
    assert bad.text == "" and bad.num_tokens == 0 and bad.finish_reason == "rejected" and not bad.truncated
    assert bad.error.startswith("HTTP 400: Input contains a forbidden phrase. xxx") and len(bad.error) < 330
    assert out[0][0].text.startswith("echo:ok1:") and out[2][1].text.startswith("echo:ok2:")
    assert eng.rejections == {"http_400": 2} and eng.retries == 0  # refused, not retried
    assert progress[-1] == 6


def test_401_for_every_request_fails_fast_naming_status_and_message(server, monkeypatch):
    """A bad key must not reject the whole dataset one sample at a time: exit 2 after a few answers."""
    monkeypatch.setenv(API_KEY_ENV, KEY)
    server.status_override = 401
    server.status_message = f"Incorrect API key provided: {KEY}. You can find your API key at ..."
    with open_engine(_engine(server.url, max_concurrency=4), None) as eng:
        with pytest.raises(InvalidInput, match="HTTP 401: Incorrect API key provided") as err:
            eng.generate(_users(*[f"q{i}" for i in range(100)]), Sampling(), n=1)
    assert "16 requests refused and none accepted yet" in str(err.value) and KEY not in str(err.value)
    assert "***" in str(err.value)  # the server quoted the key: masked
    assert len(server.auth) < 16 + 4 + 1  # stopped after REFUSAL_LIMIT answers (plus those in flight)


def test_a_small_first_call_refused_everywhere_fails(server):
    server.status_override = 404
    server.status_message = "The model `teacher` does not exist."
    with open_engine(_engine(server.url), None) as eng:
        with pytest.raises(InvalidInput, match="HTTP 404: The model `teacher` does not exist.*3 requests refused"):
            eng.generate(_users("a", "b", "c"), Sampling(), n=1)


def test_one_404_among_accepted_requests_is_a_rejection(server):
    server.refuse = lambda body: (404, "no such thing") if body["messages"][-1]["content"] == "b" else None
    with open_engine(_engine(server.url, max_concurrency=1), None) as eng:
        out = eng.generate(_users("a", "b", "c"), Sampling(), n=1)
    assert [s[0].rejected for s in out] == [None, "http_404", None]


def test_after_acceptance_only_a_long_run_of_refusals_stops(server):
    with open_engine(_engine(server.url, max_concurrency=2), None) as eng:
        eng.generate(_users("fine"), Sampling(), n=1)  # the endpoint accepted a request
        server.status_override = 403
        out = eng.generate(_users("a", "b", "c"), Sampling(), n=1)  # a whole small call: still rejections
        assert [s[0].rejected for s in out] == ["http_403"] * 3
        with pytest.raises(InvalidInput, match="HTTP 403.*16 requests refused in a row"):
            eng.generate(_users(*[f"q{i}" for i in range(40)]), Sampling(), n=1)  # a key revoked mid-run


# ---- max_tokens within the context ----------------------------------------------------------------------
def test_max_tokens_is_capped_to_fit_the_context(server):
    """maxModelLen == maxTokens: uncapped, vLLM answers 400 to every request; capped, all are answered."""
    server.max_model_len = 512
    convs = _users("short", "a longer prompt " * 8)
    with open_engine(_engine(server.url, max_retries=0), None) as eng:
        eng.max_model_len = None  # as if the server did not list it: the bug
        eng._looked_up_len = True
        out = eng.generate(convs, Sampling(max_tokens=512), n=1)
    assert [s[0].rejected for s in out] == ["http_400", "http_400"]
    assert "maximum context length is 512 tokens" in out[0][0].error
    server.refused.clear()
    for engine in (Engine(name="openai", max_model_len=512, endpoint=Endpoint(base_url=server.url, model="teacher")),
                   _engine(server.url)):  # set in the spec, or listed by the server on GET /models
        server.requests.clear()
        with open_engine(engine, None) as eng:
            out = eng.generate(convs, Sampling(max_tokens=512), n=1)
        assert eng.max_model_len == 512 and not server.refused
        assert all(not s[0].rejected for s in out)
        sent = {b["messages"][-1]["content"]: b["max_tokens"] for b in server.requests}
        assert sent["short"] == 512 - (len("short") + len("user") + 8 + 64)  # the byte bound
        assert sent["short"] > sent["a longer prompt " * 8] > 0
    with open_engine(_engine(server.url), None) as eng:  # room to spare: max_tokens as asked
        eng.generate(_users("short"), Sampling(max_tokens=100), n=1)
    assert server.requests[-1]["max_tokens"] == 100


def test_a_prompt_that_cannot_fit_is_rejected_unsent(server):
    server.max_model_len = 300
    with open_engine(_engine(server.url), None) as eng:
        out = eng.generate(_users("x " * 200, "fits"), Sampling(max_tokens=1000), n=2)
    assert [s.rejected for s in out[0]] == ["prompt_too_long"] * 2
    assert "estimated" in out[0][0].error and "context length is 300" in out[0][0].error
    assert [b["messages"][-1]["content"] for b in server.requests] == ["fits", "fits"]
    assert eng.requests_sent == 2 and not server.refused


def test_prompt_tokens_are_counted_with_a_local_tokenizer(server, tiny_model):
    """With the model folder at hand (Eval with spec.model), the chat template's exact count is used."""
    from branchmerge.trainer.engine.chat import load_tokenizer, prompt_token_ids

    server.max_model_len = 256
    conv = [{"role": "user", "content": "count me exactly, please"}]
    engine = Engine(name="openai", max_model_len=256, endpoint=Endpoint(base_url=server.url, model="teacher"))
    with open_engine(engine, tiny_model) as eng:
        eng.generate([conv], Sampling(max_tokens=256), n=1)
    exact = len(prompt_token_ids(load_tokenizer(tiny_model), conv))
    assert server.requests[0]["max_tokens"] == 256 - exact


def test_error_events_in_a_stream_are_classified():
    from branchmerge.trainer.engine.openai_engine import _Refused, _Transient
    from branchmerge.trainer.engine.sse import StreamedAnswer

    eng = OpenAIEngine(_engine("http://127.0.0.1:9"))
    with pytest.raises(_Refused, match="HTTP 400: too long"):
        eng._fold(StreamedAnswer(), '{"error": {"message": "too long", "code": 400}}')
    for payload in ('{"error": {"message": "busy", "code": 429}}', '{"object": "error", "message": "x", "code": 500}',
                    '{"error": "overloaded"}', "{not json"):
        with pytest.raises(_Transient):
            eng._fold(StreamedAnswer(), payload)
