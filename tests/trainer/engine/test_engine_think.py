"""Teacher traces start with the think tag the chat template opened, the same from every backend.

R1-Distill's generation prompt ends ``<｜Assistant｜><think>\\n``: the model writes ``reasoning</think>answer``.
The offline engines (vLLM, transformers) put the opened tag back in front; the OpenAI engine folds a separate
reasoning field back in, or restores the tag when the server returns ``reasoning</think>answer`` as content.
The template below reproduces the structure of R1-Distill-Qwen's (written here, not copied).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from branchmerge.api.common import Endpoint, Engine, Sampling
from branchmerge.trainer.engine import open_engine
from branchmerge.trainer.engine import vllm_engine
from branchmerge.trainer.engine.base import TextEngine
from branchmerge.trainer.engine.chat import join_reasoning, load_tokenizer, opened_think, render_prompt
from tests.chat_templates import R1_TEMPLATE

RAW = "2 + 2 = 4.\n</think>\n\nThe answer is \\boxed{4}."  # what the model writes after R1's prompt
TRACE = "<think>\n" + RAW  # the trace every backend must give
CONV = [{"role": "user", "content": "what is 2 + 2?"}]


def test_opened_think():
    assert opened_think("<｜User｜>q<｜Assistant｜><think>\n") == "<think>\n"
    assert opened_think("<|im_start|>assistant\n") == ""
    assert opened_think("<|im_start|>assistant\n<think>\n\n</think>\n\n") == ""  # closed: thinking off


def _fake_vllm(tokenizer, outputs):
    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            self.prompts = prompts
            return [SimpleNamespace(outputs=[SimpleNamespace(index=i, text=t, token_ids=[1, 2, 3], finish_reason="stop")
                                             for i, t in enumerate(outputs)]) for _ in prompts]

    eng = vllm_engine.VllmEngine.__new__(vllm_engine.VllmEngine)
    TextEngine.__init__(eng)
    eng.tokenizer, eng.llm = tokenizer, FakeLLM()
    return eng


def test_offline_vllm_traces_start_with_the_opened_think_tag(tiny_model, monkeypatch):
    monkeypatch.setattr(vllm_engine, "sampling_params", lambda sampling, n, seed: None)  # no vllm import
    tok = load_tokenizer(tiny_model, chat_template=R1_TEMPLATE)
    assert render_prompt(tok, CONV).endswith("<｜Assistant｜><think>\n")
    eng = _fake_vllm(tok, [RAW, "<think>\nown tag</think>x", "cut off mid-reason"])
    out = eng.generate([CONV], Sampling(max_tokens=8), n=3)[0]
    assert [c.text for c in out] == [TRACE, "<think>\nown tag</think>x", "<think>\ncut off mid-reason"]
    assert all(c.token_ids == [1, 2, 3] and c.num_tokens == 3 for c in out)  # only what the model generated
    # the prompt sent is the template's, <think>\n included
    assert tok.decode(eng.llm.prompts[0]["prompt_token_ids"]) == render_prompt(tok, CONV)
    # a template that opens nothing leaves the text alone
    eng = _fake_vllm(load_tokenizer(tiny_model), [RAW])
    assert eng.generate([CONV], Sampling(max_tokens=8))[0][0].text == RAW


def test_transformers_traces_start_with_the_opened_think_tag(tiny_model):
    engine = Engine(name="transformers", dtype="float32", chat_template=R1_TEMPLATE)
    with open_engine(engine, tiny_model) as eng:
        out = eng.generate([CONV], Sampling(temperature=0.0, max_tokens=4))[0][0]
    assert out.text.startswith("<think>") and out.num_tokens == len(out.token_ids) <= 4


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": RAW},  # no reasoning parser: the server's prompt held <think>\n
    {"role": "assistant", "content": "\n\nThe answer is \\boxed{4}.", "reasoning_content": "2 + 2 = 4.\n"},
    {"role": "assistant", "content": "The answer is \\boxed{4}.", "reasoning": "2 + 2 = 4."},
    {"role": "assistant", "content": TRACE},  # a server that returns the tag itself
])
def test_openai_traces_equal_the_offline_ones(server, message):
    server.message = lambda body: message
    engine = Engine(name="openai", endpoint=Endpoint(base_url=server.url, model="teacher"))
    with open_engine(engine, None) as eng:
        assert eng.generate([CONV], Sampling(max_tokens=64))[0][0].text == TRACE


def test_truncated_reasoning_is_not_closed():
    assert join_reasoning("", "2 + 2 =", truncated=True) == "<think>\n2 + 2 ="
    assert join_reasoning("plain answer", None) == "plain answer"
