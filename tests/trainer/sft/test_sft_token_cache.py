"""The token cache (token_cache.py): a second start loads the samples instead of tokenising, identical to a
fresh tokenisation; what changes the samples changes the key; a damaged cache is rebuilt; ranks other than 0
wait for rank 0's cache; the stage reports ``tokenCache`` and removes the cache once it publishes."""
from __future__ import annotations

import json
import shutil
import threading

import pytest

from branchmerge.api.sft import BranchSFTSpec
from branchmerge.api.uris import local_path
from branchmerge.trainer.errors import InvalidInput
from branchmerge.trainer.sft import token_cache
from branchmerge.trainer.sft.checkpoint import checkpoint_root
from branchmerge.trainer.sft.dataset import build_samples
from branchmerge.trainer.sft.engine import load_tokenizer

from .sft_helpers import make_spec, reasoning_records, run_sft, write_jsonl

TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def resolve(ref, what):
    return local_path(ref.uri)


def spec_of(data: list, **training) -> BranchSFTSpec:
    return BranchSFTSpec.model_validate({
        "base": {"uri": "file:///m"}, "chatTemplate": TEMPLATE,
        "data": [{"uri": path.as_uri(), "weight": weight} for path, weight in data],
        "training": {"maxSeqLen": 128, **training}})


@pytest.fixture
def data(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", reasoning_records(12, seed=1))
    b = write_jsonl(tmp_path / "b" / "part-0.jsonl", reasoning_records(10, seed=2)).parent  # a folder
    return [(a, 2.0), (b, 0.5)]  # a repeated twice, half of b


def cached(spec, tiny_model, root, **kw):
    tokenizer = load_tokenizer(tiny_model, spec)
    samples, stats, status = token_cache.load_or_build(spec, tokenizer, tiny_model, resolve, root, **kw)
    return samples, stats, status, tokenizer


def no_tokenising(*args, **kwargs):
    raise AssertionError("tokenised although the cache holds the samples")


def test_second_start_loads_identical_samples_without_tokenising(tmp_path, tiny_model, data, monkeypatch):
    spec = spec_of(data)
    root = tmp_path / "tokens"
    fresh, fresh_stats = build_samples(spec, load_tokenizer(tiny_model, spec), resolve)
    samples, stats, status, _ = cached(spec, tiny_model, root)
    assert status == "miss" and [p.name for p in root.iterdir()] and stats == fresh_stats

    monkeypatch.setattr(token_cache, "build_samples", no_tokenising)
    again, again_stats, status, tokenizer = cached(spec, tiny_model, root)
    assert status == "hit" and again_stats == fresh_stats
    assert [(s.input_ids, s.labels) for s in again] == [(s.input_ids, s.labels) for s in fresh]
    assert len({id(s) for s in again}) < len(again)  # weight 2: a repeated sample is one object, as mixed
    # the published tokenizer keeps the base model's template on a hit too (dataset.training_template)
    assert tokenizer.chat_template != TEMPLATE and tokenizer.chat_template == load_tokenizer(
        tiny_model, spec_of(data).model_copy(update={"chat_template": None})).chat_template
    manifest = json.loads(next(root.glob("*/manifest.json")).read_text())
    unique = {id(s): s for s in again}.values()
    assert manifest["samples"] == len(fresh) and manifest["uniqueSamples"] == len(unique) < len(fresh)
    assert manifest["storedTokens"] == sum(len(s.input_ids) for s in unique)


def test_what_changes_the_samples_changes_the_key(tmp_path, tiny_model, data):
    def key(spec, tokenizer_dir=tiny_model):
        return token_cache.cache_key(spec, spec.chat_template, tokenizer_dir, resolve)

    base = key(spec_of(data))
    # not about tokenisation: the same samples
    assert key(spec_of(data, packing="none", learningRate=1e-3, epochs=5, microBatchSize=2)) == base
    changed = {
        "maxSeqLen": key(spec_of(data, maxSeqLen=256)),
        "overLength": key(spec_of(data, overLength="truncate")),
        "seed": key(spec_of(data, seed=99)),
        "weight": key(spec_of([data[0], (data[1][0], 1.0)])),
        "template": key(spec_of(data).model_copy(update={"chat_template": TEMPLATE + " "})),
    }
    write_jsonl(data[0][0], reasoning_records(12, seed=5))  # same file, new content
    changed["data content"] = key(spec_of(data))
    tok = tmp_path / "tok"
    shutil.copytree(tiny_model, tok)
    assert key(spec_of(data), tok) == changed["data content"]  # a copy: same content, same key
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    changed["tokenizer"] = key(spec_of(data), tok)
    assert len({base, *changed.values()}) == len(changed) + 1, changed


def test_a_damaged_cache_is_ignored_and_rebuilt(tmp_path, tiny_model, data):
    spec = spec_of(data)
    root = tmp_path / "tokens"
    samples, *_ = cached(spec, tiny_model, root)
    [folder] = [p for p in root.iterdir() if p.is_dir()]
    tokens = folder / token_cache.TOKENS
    size = tokens.stat().st_size
    for damage in ("truncated", "same size, other bytes", "no manifest"):
        if damage == "truncated":
            tokens.write_bytes(tokens.read_bytes()[: size // 2])
        elif damage == "same size, other bytes":
            data_bytes = bytearray(tokens.read_bytes())
            data_bytes[-1] ^= 0xFF
            tokens.write_bytes(bytes(data_bytes))
        else:
            (folder / token_cache.MANIFEST).unlink()
        assert token_cache.load(folder, folder.name) is None, damage
        again, _, status, _ = cached(spec, tiny_model, root)
        assert status == "miss", damage  # rebuilt ...
        assert token_cache.load(folder, folder.name) is not None  # ... and written again, whole
        assert [s.input_ids for s in again] == [s.input_ids for s in samples]
        assert tokens.stat().st_size == size
    assert not list(root.glob(".tmp-*"))


def test_other_ranks_wait_for_rank_0(tmp_path, tiny_model, data, monkeypatch):
    spec = spec_of(data)
    root = tmp_path / "tokens"
    real_build = token_cache.build_samples
    building_rank = threading.local()

    def build(*args):
        if getattr(building_rank, "rank", 0) != 0:
            no_tokenising()
        return real_build(*args)

    monkeypatch.setattr(token_cache, "build_samples", build)
    results = {}

    def rank1():
        building_rank.rank = 1
        results[1] = cached(spec, tiny_model, root, rank=1, world_size=2, wait_s=60, poll_s=0.05)

    waiter = threading.Thread(target=rank1)
    waiter.start()
    samples, _, status, _ = cached(spec, tiny_model, root, rank=0, world_size=2)
    waiter.join(60)
    assert status == "miss" and results[1][2] == "hit"
    assert [s.labels for s in results[1][0]] == [s.labels for s in samples]


def test_invalid_data_on_rank_0_stops_the_waiting_ranks(tmp_path, tiny_model):
    spec = spec_of([(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "word " * 100, "response": "ok"}]), 1.0)],
                   maxSeqLen=32, overLength="truncate")
    root = tmp_path / "tokens"
    with pytest.raises(InvalidInput, match="maxSeqLen=32"):
        cached(spec, tiny_model, root, rank=0, world_size=2)
    # rank 1 does not wait out its timeout: it sees rank 0's verdict, tokenises and fails the same way
    with pytest.raises(InvalidInput, match="maxSeqLen=32"):
        cached(spec, tiny_model, root, rank=1, world_size=2, wait_s=600, poll_s=0.05)


def test_without_rank_0_a_rank_tokenises_itself_after_the_timeout(tmp_path, tiny_model, data):
    samples, _, status, _ = cached(spec_of(data), tiny_model, tmp_path / "tokens", rank=1, world_size=2,
                                   wait_s=0.2, poll_s=0.05)
    assert status == "miss" and samples and not (tmp_path / "tokens").exists()  # only rank 0 writes


@pytest.mark.slow
def test_stage_loads_the_cache_and_removes_it_when_it_publishes(tmp_path, tiny_model):
    """One real stage run whose samples are already cached (as after a killed attempt): it reports a hit,
    trains, publishes, and leaves neither tokens nor checkpoints behind."""
    data = write_jsonl(tmp_path / "d.jsonl", reasoning_records(16, seed=3))
    spec_file = make_spec(tmp_path, tiny_model, data, training={"epochs": 1})
    from branchmerge.trainer.stage import load_spec_file

    spec = load_spec_file(spec_file).spec
    root = token_cache.cache_root(tmp_path / "out", spec.checkpointing.uri)
    samples, _, status, _ = cached(spec, tiny_model, root)
    assert status == "miss" and root.parent == checkpoint_root(tmp_path / "out")

    code, result, output = run_sft(spec_file)
    assert code == 0, output[-3000:]
    assert result["metrics"]["tokenCache"] == "hit" and "tokenCache: hit" in output
    assert result["metrics"]["samples"] == len(samples)
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not root.exists() and not checkpoint_root(tmp_path / "out").exists()
