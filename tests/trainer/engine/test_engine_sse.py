"""Server-sent events of streamed chat completions: decoding whatever the chunking, folding chunks into one answer."""
from __future__ import annotations

import json

import pytest

from branchmerge.trainer.engine.sse import SSEDecoder, StreamedAnswer, StreamError


def _chunk(delta: dict, finish: str | None = None) -> str:
    return json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                                        "finish_reason": finish}]})


STREAM = (": keep-alive comment\r\n\r\n"
          f"data: {_chunk({'role': 'assistant', 'content': ''})}\r\n\r\n"
          f"data: {_chunk({'reasoning_content': 'think é'})}\n\n"
          f"data: {_chunk({'content': 'answer'})}\n\n"
          f"data: {_chunk({}, 'stop')}\n\n"
          'data: {"choices": [], "usage": {"completion_tokens": 7}}\n\n'
          "data: [DONE]\n\n").encode()


@pytest.mark.parametrize("size", [1, 2, 7, 64, len(STREAM)])
def test_decoding_does_not_depend_on_chunk_boundaries(size):
    decoder, answer = SSEDecoder(), StreamedAnswer()
    for start in range(0, len(STREAM), size):  # splits lines, CRLFs and multi-byte characters
        for payload in decoder.feed(STREAM[start:start + size]):
            answer.add(payload)
    assert decoder.close() == []
    assert answer.done and answer.finished and answer.finish_reason == "stop"
    assert answer.text() == ("answer", "think é") and answer.usage == {"completion_tokens": 7}


def test_multi_line_data_and_a_last_event_without_blank_line():
    decoder = SSEDecoder()
    assert decoder.feed(b"event: x\ndata: {\"a\":\ndata:1}\n\nid: 3\ndata:[DONE]") == ['{"a":\n1}']
    assert decoder.close() == ["[DONE]"]


def test_reasoning_field_precedence_and_other_choices_ignored():
    answer = StreamedAnswer()
    answer.add(_chunk({"reasoning_content": "a", "reasoning": "a"}))  # servers sending both: counted once
    answer.add(_chunk({"reasoning": "b"}))
    answer.add(json.dumps({"choices": [{"index": 1, "delta": {"content": "other"}}]}))
    assert answer.text() == ("", "ab") and not answer.finished


def test_error_events_and_malformed_payloads():
    with pytest.raises(StreamError) as err:
        StreamedAnswer().add('{"error": {"message": "prompt too long", "code": 400}}')
    assert err.value.status == 400 and str(err.value) == "prompt too long"
    with pytest.raises(StreamError) as err:  # vLLM's older shape
        StreamedAnswer().add('{"object": "error", "message": "engine dead", "code": 500}')
    assert err.value.status == 500
    with pytest.raises(StreamError) as err:
        StreamedAnswer().add('{"error": {"message": "slow down", "code": "rate_limit_exceeded"}}')
    assert err.value.status is None
    with pytest.raises(ValueError):
        StreamedAnswer().add("not json")
