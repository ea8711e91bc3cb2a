"""Merge pre-flight (trainer/merge/preflight.py) through the real stage: inputs checked from their headers,
config.json and tokenizer before any tensor is read (exit 2 naming the file and tensor), padded vocabularies
reported, and the memory/output estimate in the result metrics, compared with a merge's measured peak RSS."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from .merge_models import layer_shapes, merge_manifest, read_model, write_manifest

from branchmerge.trainer.stage import run_stage
from branchmerge.trainer.tiny import perturbed, random_tensors, write_model


def run_merge(tmp_path, manifest, name="merge"):
    spec = write_manifest(tmp_path / f"{name}.yaml", manifest)
    result_path = tmp_path / f"{name}.result.json"
    code = run_stage("merge", spec, result_path)
    return code, json.loads(result_path.read_text())


def assert_invalid(tmp_path, code, result, *needles, out="out"):
    """Exit 2, the message names every needle, nothing at the output (not even a temp folder)."""
    assert code == 2, result
    assert result["phase"] == "Failed"
    for needle in needles:
        assert needle in result["error"], result["error"]
    assert not (tmp_path / out).exists() and not list(tmp_path.glob(f".tmp-{out}-*"))


@pytest.fixture(scope="module")
def tokenizers():
    """Two real byte-level BPE tokenizers (Qwen2's pre-tokenizer) of the same size, trained on different text."""
    from branchmerge.trainer.tiny import build_tokenizer, default_corpus

    return build_tokenizer(default_corpus(0, 300), 300), build_tokenizer(default_corpus(1, 300)[::-1][:150], 300)


def model_with_tokenizer(folder: Path, tensors: dict, tokenizer, rows: int | None = None, **kw) -> Path:
    write_model(folder, tensors, **kw)
    tokenizer.save_pretrained(folder)
    if rows is not None:  # config.json says what the embedding holds, as real checkpoints do
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"vocab_size": rows}))
    return folder


@pytest.fixture()
def three(tmp_path):
    base = random_tensors(layer_shapes(), 0)
    folders = [write_model(tmp_path / "base", base), write_model(tmp_path / "a", perturbed(base, 1), shards=2),
               write_model(tmp_path / "b", perturbed(base, 2), shards=3)]
    return folders, base


def ties(tmp_path, models, base, out="out", **spec):
    return merge_manifest("m", "ties", tmp_path / out, models, base=base, parameters={"density": 0.5}, **spec)


# ------------------------------------------------------------------ headers: corrupt, truncated, missing shard

def test_corrupt_header_fails_naming_the_file(tmp_path, three):
    (base, a, b), _ = three
    shard = b / "model-00002-of-00003.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 10)  # the length prefix says more than the file holds
    shard.write_bytes(bytes(raw))
    code, result = run_merge(tmp_path, ties(tmp_path, [a, b], base))
    assert_invalid(tmp_path, code, result, str(shard), "corrupt safetensors header", "does not fit")
    raw[:8] = struct.pack("<Q", 24)
    raw[8:32] = b'{"a": {"dtype": "F32", "shape'[:24]  # cut in the middle of the JSON
    shard.write_bytes(bytes(raw))
    code, result = run_merge(tmp_path, ties(tmp_path, [a, b], base))
    assert_invalid(tmp_path, code, result, str(shard), "not JSON")


def test_truncated_file_fails_naming_the_file_and_tensor(tmp_path, three):
    (base, a, b), _ = three
    shard = a / "model-00002-of-00002.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-100])  # a download cut short: the header's last offsets point past the end
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header.pop("__metadata__", None)
    data = len(raw) - 100 - 8 - length
    last = next(name for name in header if header[name]["data_offsets"][1] > data)  # the first one past the end
    code, result = run_merge(tmp_path, ties(tmp_path, [a, b], base))
    assert_invalid(tmp_path, code, result, str(shard), f"tensor {last!r}", "outside the")


def test_index_naming_a_missing_shard_fails(tmp_path, three):
    (base, a, b), _ = three
    (b / "model-00003-of-00003.safetensors").unlink()
    code, result = run_merge(tmp_path, ties(tmp_path, [a, b], base))
    assert_invalid(tmp_path, code, result, "spec.models[1]", "model-00003-of-00003.safetensors", "missing")


# ------------------------------------------------------------------ architecture, tensors

def test_different_architecture_fails_naming_the_config_field(tmp_path, three):
    (base, a, _), base_tensors = three
    deeper = random_tensors(layer_shapes(layers=3), 5)
    write_model(tmp_path / "deep", deeper, config={"num_hidden_layers": 3})
    write_model(tmp_path / "base", base_tensors, config={"num_hidden_layers": 2})
    code, result = run_merge(tmp_path, ties(tmp_path, [a, tmp_path / "deep"], base))
    assert_invalid(tmp_path, code, result, "not the same architecture", "spec.models[1]",
                   "num_hidden_layers = 3", "has 2")
    # same tensors, another model type: the tensors would line up, their meaning would not
    write_model(tmp_path / "other", perturbed(base_tensors, 3), config={"model_type": "llama"})
    code, result = run_merge(tmp_path, ties(tmp_path, [a, tmp_path / "other"], base))
    assert_invalid(tmp_path, code, result, "model_type = 'llama'", "'toy'")


def test_missing_extra_and_misshaped_tensors_are_all_named_with_their_file(tmp_path, three):
    (base, a, _), base_tensors = three
    broken = perturbed(base_tensors, 4)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 17)
    broken["model.layers.0.extra.weight"] = torch.zeros(4)
    write_model(tmp_path / "broken", broken, shards=2)
    code, result = run_merge(tmp_path, ties(tmp_path, [a, tmp_path / "broken"], base))
    assert_invalid(tmp_path, code, result, "tensors do not match",
                   "spec.models[1]", "tensor model.layers.1.mlp.up_proj.weight is missing",
                   "tensor model.layers.0.self_attn.q_proj.weight: shapes differ: [16, 17]",
                   "model-00001-of-00002.safetensors", "[16, 16] in spec.base",
                   "has tensor model.layers.0.extra.weight")


# ------------------------------------------------------------------ tokenizers and padded vocabularies

def test_a_different_tokenizer_fails(tmp_path, tokenizers):
    ours, theirs = tokenizers
    rows = 320
    base = random_tensors(layer_shapes(vocab=rows), 0)
    model_with_tokenizer(tmp_path / "base", base, ours, rows)
    model_with_tokenizer(tmp_path / "a", perturbed(base, 1), ours, rows)
    model_with_tokenizer(tmp_path / "b", perturbed(base, 2), theirs, rows)
    code, result = run_merge(tmp_path, ties(tmp_path, [tmp_path / "a", tmp_path / "b"], tmp_path / "base"))
    assert_invalid(tmp_path, code, result, "tokenizers differ", "spec.models[1]", "token id",
                   str(tmp_path / "b" / "tokenizer.json"), "shared ids differ")
    # the same with tokenizerSource: the output would get a tokenizer the models were not trained with
    tok = tmp_path / "tok"
    tok.mkdir()
    theirs.save_pretrained(tok)
    code, result = run_merge(tmp_path, ties(tmp_path, [tmp_path / "a"], tmp_path / "base",
                                            tokenizerSource={"uri": tok.resolve().as_uri()}))
    assert_invalid(tmp_path, code, result, "spec.tokenizerSource", "spec.base", "token id")


def test_padded_vocabulary_merges_and_is_reported(tmp_path, tokenizers, capfd):
    """Qwen2.5's case at small scale: embeddings padded to a multiple of 64 rows past the tokenizer's last id."""
    tok = tokenizers[0]
    tokens, rows = len(tok), 320
    assert tokens < rows
    base = random_tensors(layer_shapes(vocab=rows), 0)
    for name, tensors in (("base", base), ("a", perturbed(base, 1)), ("b", perturbed(base, 2))):
        model_with_tokenizer(tmp_path / name, tensors, tok, rows)
    code, result = run_merge(tmp_path, ties(tmp_path, [tmp_path / "a", tmp_path / "b"], tmp_path / "base"))
    assert code == 0, result
    pre = result["metrics"]["preflight"]
    assert pre["tokenizer"] == "identical"
    assert pre["vocab"] == {"tokens": tokens, "rows": rows, "rowsBefore": rows, "trimmedRows": 0,
                            "paddingRows": rows - tokens, "tokenizer": "spec.base"}
    err = capfd.readouterr().err
    assert f"rows {tokens}..{rows - 1} ({rows - tokens}) are padding" in err and "the output keeps them" in err
    out = read_model(tmp_path / "out")
    assert out["model.embed_tokens.weight"].shape == (rows, 16) and out["lm_head.weight"].shape == (rows, 16)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == rows

    # mergekit #425: one input's embeddings were cut to the tokenizer's size. The engine trims every input
    # to the common rows; the pre-flight checks that only padding goes, and says so.
    cut = {n: (t[:tokens] if t.shape[0] == rows else t) for n, t in perturbed(base, 3).items()}
    model_with_tokenizer(tmp_path / "cut", cut, tok, tokens)
    code, result = run_merge(tmp_path, ties(tmp_path, [tmp_path / "a", tmp_path / "cut"], tmp_path / "base",
                                            out="out-cut"), "cut")
    assert code == 0, result
    pre = result["metrics"]["preflight"]
    assert pre["tokenizer"] == "identical" and pre["vocab"]["rows"] == tokens
    assert pre["vocab"]["trimmedRows"] == rows - tokens and pre["vocab"]["paddingRows"] == 0
    assert f"trimmed from {rows} to {tokens}" in capfd.readouterr().err
    assert read_model(tmp_path / "out-cut")["lm_head.weight"].shape == (tokens, 16)

    # cut below the tokenizer's size: ids would have no row; exit 2 before anything is read
    short = {n: (t[:tokens - 4] if t.shape[0] == rows else t) for n, t in perturbed(base, 4).items()}
    model_with_tokenizer(tmp_path / "short", short, tok, tokens - 4)
    code, result = run_merge(tmp_path, ties(tmp_path, [tmp_path / "a", tmp_path / "short"], tmp_path / "base",
                                            out="out-short"), "short")
    assert_invalid(tmp_path, code, result, f"has {tokens} tokens", f"keep {tokens - 4} rows",
                   f"token ids {tokens - 4}..{tokens - 1} would have no row", out="out-short")


# ------------------------------------------------------------------ headers only; the estimate

def test_preflight_reads_headers_only(tmp_path):
    """build_recipe (folders opened, pre-flight, plan, estimate) maps no shard and reads no more bytes than the
    headers, index and configs hold."""
    from branchmerge.api.uris import local_path
    from branchmerge.trainer.merge import stage
    from branchmerge.trainer.stage import load_spec_file

    tensors = random_tensors(layer_shapes(hidden=128, vocab=1000), 0)
    base, a, b = (write_model(tmp_path / name, perturbed(tensors, seed), shards=2)
                  for seed, name in enumerate(("base", "a", "b")))
    resource = load_spec_file(write_manifest(tmp_path / "m.yaml", ties(tmp_path, [a, b], base)))

    class Ctx:
        spec = resource.spec

        def input_path(self, ref, label):
            return local_path(ref.uri)

    def rchar() -> int:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])

    before = rchar()
    folders = stage._Folders(Ctx())
    recipe, _, report = stage.build_recipe(resource.spec, folders)
    read = rchar() - before
    try:
        shards = [f for folder in folders.by_path.values() for f in folder.files.values()]
        assert len(shards) == 6 and all(f._mm is None for f in shards)
        data = sum(f.path.stat().st_size for f in shards)
        described = sum(p.stat().st_size for d in (base, a, b) for p in d.iterdir() if p.suffix == ".json")
        headers = sum(8 + struct.unpack("<Q", f.path.read_bytes()[:8])[0] for f in shards)
        # the header is read through Python's buffered file: at most one buffer past it per shard
        assert read <= headers + described + len(shards) * io.DEFAULT_BUFFER_SIZE
        assert read < data / 50, (read, data)
        assert report.metrics()["tensors"] == len(recipe.layout.tensors)
    finally:
        folders.close()


# VmHWM, this process image's own peak: ru_maxrss would carry over the forking parent's RSS (kept across exec).
MEASURE = """
import json, sys
from branchmerge.trainer.stage import run_stage
code = run_stage("merge", sys.argv[1], sys.argv[2])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "maxrss": hwm * 1024}))
"""


def test_estimate_is_in_the_metrics_and_near_the_measured_peak(tmp_path):
    """The merge runs in a fresh process (its peak RSS is the stage's own): the estimate of the pre-flight is
    within a small factor of it, and the output bytes are exactly what lands in the folder."""
    shapes = layer_shapes(hidden=512, vocab=8000, layers=4)
    base = random_tensors(shapes, 0)
    for name, tensors in (("base", base), ("a", perturbed(base, 1)), ("b", perturbed(base, 2))):
        write_model(tmp_path / name, tensors, shards=2)
    spec = write_manifest(tmp_path / "m.yaml", ties(tmp_path, [tmp_path / "a", tmp_path / "b"], tmp_path / "base"))
    done = subprocess.run([sys.executable, "-c", MEASURE, str(spec), str(tmp_path / "r.json")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["code"] == 0, done.stderr
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    pre = metrics["preflight"]
    assert pre["tensors"] == metrics["tensorsMerged"] == len(shapes)
    assert pre["dtypes"] == {"base": "F32", "models[0]": "F32", "models[1]": "F32"}
    out = tmp_path / "out"
    published = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors" or p.name in (
        "model.safetensors.index.json", "config.json"))
    assert pre["outputBytes"] == published
    # the model is 3 x 76 MB: the working set must be a visible part of the peak, not just the interpreter
    assert pre["workingSetBytes"] > 50 << 20
    ratio = pre["peakMemoryBytes"] / measured["maxrss"]
    print(f"estimate {pre['peakMemoryBytes'] >> 20} MiB ({pre['processBytes'] >> 20} + {pre['workingSetBytes'] >> 20}),"
          f" measured peak RSS {measured['maxrss'] >> 20} MiB, ratio {ratio:.2f}")
    assert 0.7 <= ratio <= 2.0, (pre, measured)
    assert "estimated peak memory" in done.stderr


def test_a_memory_limit_below_the_estimate_is_a_warning(tmp_path, three, monkeypatch, capfd):
    from branchmerge.trainer.merge import preflight

    (base, a, b), _ = three
    limit = tmp_path / "memory.max"
    limit.write_text("1048576\n")
    monkeypatch.setattr(preflight, "CGROUP_LIMIT_FILES", (str(limit),))
    code, result = run_merge(tmp_path, ties(tmp_path, [a, b], base))
    assert code == 0, result  # a warning: the estimate is an estimate
    assert result["metrics"]["preflight"]["memoryLimitBytes"] == 1048576
    err = capfd.readouterr().err
    assert "WARNING: the memory limit (0.00 GiB, cgroup) is below the estimated peak" in err
    limit.write_text("max\n")  # cgroup v2 without a limit
    code, result = run_merge(tmp_path, ties(tmp_path, [a, b], base, out="out2"), "unlimited")
    assert code == 0, result
    assert "memoryLimitBytes" not in result["metrics"]["preflight"]
    assert "WARNING" not in capfd.readouterr().err
