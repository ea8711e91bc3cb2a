"""The Merge stage on model folders: sharded inputs and outputs, tied embeddings, vocabulary trimming,
dtypes, per-tensor overrides, copied assets, metrics, progress, and exit-2 errors that leave no output."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from .merge_models import layer_shapes, merge_manifest, read_model, write_manifest
from safetensors import safe_open

from branchmerge.api.outputs import read_manifest
from branchmerge.trainer.stage import run_stage
from branchmerge.trainer.tiny import perturbed, random_tensors, write_model


def run_merge(tmp_path, manifest, name="merge"):
    spec = write_manifest(tmp_path / f"{name}.yaml", manifest)
    result_path = tmp_path / f"{name}.result.json"
    code = run_stage("merge", spec, result_path)
    return code, json.loads(result_path.read_text())


@pytest.fixture()
def three(tmp_path):
    """base + two fine-tuned variants; the variants are sharded differently (index files)."""
    base = random_tensors(layer_shapes(), 0)
    a, b = perturbed(base, 1), perturbed(base, 2)
    paths = (write_model(tmp_path / "base", base, extra_files={
                 "tokenizer.json": '{"base": true}', "tokenizer_config.json": "{}",
                 "chat_template.jinja": "{{ messages }}", "generation_config.json": '{"do_sample": true}',
                 "trainer_state.json": "{}"}),
             write_model(tmp_path / "a", a, shards=2),
             write_model(tmp_path / "b", b, shards=3))
    return paths, (base, a, b)


def test_ties_folder_merge_with_small_shards(tmp_path, three):
    (base_dir, a_dir, b_dir), (base, a, b) = three
    shard = 1000
    m = merge_manifest("m", "ties", tmp_path / "out", [(a_dir, {"weight": 1.0}), (b_dir, {"weight": 0.5})],
                       base=base_dir, parameters={"density": 0.5}, outShardSize=f"{shard}B")
    progress = tmp_path / "progress.jsonl"
    import os
    os.environ["BRANCHMERGE_PROGRESS_FILE"] = str(progress)
    try:
        code, result = run_merge(tmp_path, m)
    finally:
        del os.environ["BRANCHMERGE_PROGRESS_FILE"]
    assert code == 0, result
    out = tmp_path / "out"
    merged = read_model(out)
    assert list(merged) and set(merged) == set(base)
    # every shard holds at most `shard` bytes of tensor data unless it is a single larger tensor
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == result["metrics"]["shards"] > 3
    for f in files:
        with safe_open(out / f, "pt") as st:
            sizes = [st.get_tensor(k).numel() * 4 for k in st.keys()]
        assert sum(sizes) <= shard or len(sizes) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in base.values())
    # same result as the method applied tensor by tensor
    from branchmerge.trainer.merge.methods import ties
    from branchmerge.trainer.merge.methods.base import MergeInputs, TensorParams
    for name, t in base.items():
        expected = ties.merge(MergeInputs(name, t, [a[name], b[name]],
                                          TensorParams((1.0, 0.5), (0.5, 0.5)), torch.Generator())).tensor
        assert torch.equal(merged[name], expected), name
    metrics = result["metrics"]
    assert metrics["tensorsMerged"] == len(base) and metrics["bytesRead"] == 3 * metrics["parameters"] * 4
    assert set(metrics["fractionTaken"]) == {"models[0]", "models[1]"}
    assert 0.2 < metrics["fractionTaken"]["models[0]"] < 0.5
    assert metrics["bytesWritten"] >= metrics["parameters"] * 4 and metrics["elapsedSeconds"] >= 0
    # config, generation config, tokenizer and chat template from the base; no training leftovers
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    assert not (out / "trainer_state.json").exists()
    provenance = json.loads((out / "branchmerge_merge.json").read_text())
    assert provenance["spec"]["method"] == "ties" and provenance["metrics"]["tensorsMerged"] == len(base)
    assert read_manifest(out) is not None and result["digest"].startswith("sha256:")
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert events[-1]["fraction"] == 1.0 and events[-1]["metrics"]["tensorsMerged"] == len(base)


def test_tied_embeddings_both_directions(tmp_path):
    base_t = random_tensors(layer_shapes(tied=True), 0)  # no lm_head: tied
    untied = perturbed(base_t, 1) | random_tensors({"lm_head.weight": (40, 16)}, 9)
    write_model(tmp_path / "tied", base_t)
    write_model(tmp_path / "untied", untied)
    # tied base: output stays tied (no lm_head), the untied model's lm_head is not used
    code, result = run_merge(tmp_path, merge_manifest("m", "linear", tmp_path / "o1",
                                                      [tmp_path / "untied", tmp_path / "tied"],
                                                      base=tmp_path / "tied"), "m1")
    assert code == 0, result
    out = read_model(tmp_path / "o1")
    assert "lm_head.weight" not in out
    assert torch.allclose(out["model.embed_tokens.weight"],
                          (base_t["model.embed_tokens.weight"] + untied["model.embed_tokens.weight"]) / 2)
    # untied reference: the tied model contributes its input embedding as lm_head
    code, result = run_merge(tmp_path, merge_manifest("m", "task_arithmetic", tmp_path / "o2",
                                                      [tmp_path / "tied"], base=tmp_path / "untied"), "m2")
    assert code == 0, result
    out = read_model(tmp_path / "o2")
    assert torch.allclose(out["lm_head.weight"], base_t["model.embed_tokens.weight"], atol=1e-6)


def test_vocab_mismatch_is_trimmed_and_reported(tmp_path):
    big = random_tensors(layer_shapes(vocab=44), 0)
    small = {n: (t[:40] if t.shape[0] == 44 else t) for n, t in perturbed(big, 1).items()}
    write_model(tmp_path / "big", big)
    write_model(tmp_path / "small", small)
    m = merge_manifest("m", "arcee_fusion", tmp_path / "out", [tmp_path / "small", tmp_path / "big"],
                       base=tmp_path / "big", outDtype="bfloat16")
    code, result = run_merge(tmp_path, m)
    assert code == 0, result
    out = read_model(tmp_path / "out")
    assert out["model.embed_tokens.weight"].shape == (40, 16) and out["lm_head.weight"].shape == (40, 16)
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    metrics = result["metrics"]
    assert metrics["vocabTrimmed"] is True and metrics["vocabSize"] == 40
    assert sorted(metrics["vocabRowsBefore"].values()) == [40, 44]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 40 and config["dtype"] == "bfloat16"
    fractions = metrics["fractionTaken"]
    assert fractions["models[0]"] + fractions["models[1]"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < fractions["models[0]"] < 0.5


def test_overrides_first_match_wins_and_compute_dtype(tmp_path):
    a = random_tensors(layer_shapes(), 0)
    b = random_tensors(layer_shapes(), 1)
    write_model(tmp_path / "a", a)
    write_model(tmp_path / "b", b)
    m = merge_manifest("m", "slerp", tmp_path / "out", [tmp_path / "a", tmp_path / "b"],
                       parameters={"t": 0.5, "overrides": [{"tensors": "self_attn", "t": 0.0},
                                                           {"tensors": r"q_proj|mlp", "t": 1.0}]})
    code, result = run_merge(tmp_path, m)
    assert code == 0, result
    out = read_model(tmp_path / "out")
    q = "model.layers.0.self_attn.q_proj.weight"
    up = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(out[q], a[q], atol=1e-6)  # first override (t=0), although the second matches too
    assert torch.allclose(out[up], b[up], atol=1e-6)  # second override (t=1)
    norm = "model.norm.weight"
    assert not torch.allclose(out[norm], a[norm]) and not torch.allclose(out[norm], b[norm])
    # bfloat16 compute, float32 output (the inputs' dtype)
    m = merge_manifest("m", "linear", tmp_path / "bf", [tmp_path / "a", tmp_path / "b"], dtype="bfloat16")
    code, result = run_merge(tmp_path, m, "bf")
    assert code == 0, result
    out = read_model(tmp_path / "bf")
    expected = ((a[norm].bfloat16() + b[norm].bfloat16()) / 2).float()
    assert out[norm].dtype == torch.float32 and torch.allclose(out[norm], expected, atol=1e-2)


def test_tokenizer_source(tmp_path, three):
    (base_dir, a_dir, _), _ = three
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"other": true}')
    m = merge_manifest("m", "task_arithmetic", tmp_path / "out", [a_dir], base=base_dir,
                       tokenizerSource={"uri": tok.resolve().as_uri()})
    code, result = run_merge(tmp_path, m)
    assert code == 0, result
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"other": True}
    assert not (tmp_path / "out" / "chat_template.jinja").exists()


# ------------------------------------------------------------------ errors: exit 2, nothing at the output

def _assert_failed_cleanly(tmp_path, code, result, *needles):
    assert code == 2, result
    assert result["phase"] == "Failed"
    for needle in needles:
        assert needle in result["error"], result["error"]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-out-*"))


def test_corrupt_shard_header(tmp_path, three):
    (base_dir, a_dir, b_dir), _ = three
    shard = b_dir / "model-00002-of-00003.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 10)  # header length beyond the file
    shard.write_bytes(bytes(raw))
    code, result = run_merge(tmp_path, merge_manifest("m", "ties", tmp_path / "out", [a_dir, b_dir],
                                                      base=base_dir, parameters={"density": 0.5}))
    _assert_failed_cleanly(tmp_path, code, result, "model-00002-of-00003.safetensors", "corrupt safetensors header")
    raw[:8] = struct.pack("<Q", 20)
    raw[8:28] = b"{not json at all....."[:20]
    shard.write_bytes(bytes(raw))
    code, result = run_merge(tmp_path, merge_manifest("m", "ties", tmp_path / "out", [a_dir, b_dir],
                                                      base=base_dir, parameters={"density": 0.5}))
    _assert_failed_cleanly(tmp_path, code, result, "not JSON")


def test_missing_tensor_and_shape_mismatch(tmp_path, three):
    (base_dir, a_dir, _), (base, a, _) = three
    missing = dict(a)
    del missing["model.layers.1.mlp.up_proj.weight"]
    write_model(tmp_path / "missing", missing)
    code, result = run_merge(tmp_path, merge_manifest("m", "ties", tmp_path / "out", [tmp_path / "missing"],
                                                      base=base_dir, parameters={"density": 0.5}))
    _assert_failed_cleanly(tmp_path, code, result, "spec.models[0]", "model.layers.1.mlp.up_proj.weight", "missing")
    wrong = dict(a) | {"model.layers.0.mlp.up_proj.weight": torch.zeros(32, 17)}
    write_model(tmp_path / "wrong", wrong)
    code, result = run_merge(tmp_path, merge_manifest("m", "ties", tmp_path / "out", [tmp_path / "wrong"],
                                                      base=base_dir, parameters={"density": 0.5}))
    _assert_failed_cleanly(tmp_path, code, result, "model.layers.0.mlp.up_proj.weight", "shapes differ")


def test_unknown_parameters_are_rejected(tmp_path, three):
    (base_dir, a_dir, b_dir), _ = three
    cases = [
        ({"parameters": {"t": 0.3, "density": 0.5}}, "spec.parameters.t"),  # t means nothing to ties
        ({"parameters": {"density": 0.5, "bogus": 1}}, "bogus"),  # not a field at all (schema)
        ({"parameters": {"density": 0.5, "overrides": [{"tensors": "mlp", "t": 0.1}]}},
         "spec.parameters.overrides[0].t"),
        ({"parameters": {"density": 0.5, "overrides": [{"tensors": "(mlp"}]}}, "bad regular expression"),
        ({"parameters": {"density": 0.5}, "outShardSize": "5XB"}, "outShardSize"),
    ]
    for extra, needle in cases:
        code, result = run_merge(tmp_path, merge_manifest("m", "ties", tmp_path / "out", [a_dir, b_dir],
                                                          base=base_dir, **extra))
        _assert_failed_cleanly(tmp_path, code, result, needle)
    code, result = run_merge(tmp_path, merge_manifest("m", "arcee_fusion", tmp_path / "out",
                                                      [(a_dir, {"density": 0.5}), base_dir], base=base_dir))
    _assert_failed_cleanly(tmp_path, code, result, "spec.models[0].density")


def test_output_inside_an_input_is_rejected(tmp_path, three):
    (base_dir, a_dir, _), _ = three
    code, result = run_merge(tmp_path, merge_manifest("m", "task_arithmetic", a_dir / "merged", [a_dir],
                                                      base=base_dir))
    assert code == 2 and "spec.output.uri" in result["error"]


@pytest.mark.parametrize("method", ["arcee_fusion", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                                    "slerp", "model_stock"])
def test_huge_tensors_merged_in_row_blocks_give_the_same_result(tmp_path, method, monkeypatch):
    from branchmerge.trainer.merge import engine
    # 1100 x 1000 > the 1e6-entry sample size of arcee_fusion; the other model has 10 extra vocab rows
    base = random_tensors({"model.embed_tokens.weight": (1100, 1000), "model.norm.weight": (1000,)}, 0)
    other = perturbed(base, 1, 0.5)
    other["model.embed_tokens.weight"] = torch.cat([other["model.embed_tokens.weight"], torch.ones(10, 1000)])
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "other", other)
    other2 = perturbed(base, 2, 0.5)
    other2["model.embed_tokens.weight"] = other["model.embed_tokens.weight"] * 0.5
    write_model(tmp_path / "other2", other2)
    from branchmerge.trainer.merge.methods import METHODS
    module = METHODS[method]
    blocks_seen = []

    def counting(src, real=module.merge_blocks):
        for out in real(src):
            blocks_seen.append(out.tensor.shape[0])
            yield out
    monkeypatch.setattr(module, "merge_blocks", counting)
    outputs = []
    for name, above, block in (("whole", 1 << 40, 1 << 40), ("blocks", 1 << 20, 300_000)):
        monkeypatch.setattr(engine, "BLOCKED_ABOVE_BYTES", above)
        monkeypatch.setattr(engine, "BLOCK_BYTES", block)
        models = [tmp_path / "other", tmp_path / "base"]
        extra = {"parameters": {"density": 0.3}} if method in ("ties", "dare_ties", "dare_linear") else \
            {"parameters": {"t": 0.3}} if method == "slerp" else {}
        if method == "model_stock":  # needs 2 models besides the base
            models = [tmp_path / "other", tmp_path / "other2"]
        m = merge_manifest("m", method, tmp_path / name, models, base=tmp_path / "base", seed=3,
                           outDtype="bfloat16", **extra)
        code, result = run_merge(tmp_path, m, name)
        assert code == 0, result
        outputs.append((read_model(tmp_path / name), result["metrics"]))
    (whole, m1), (blocks, m2) = outputs
    assert whole["model.embed_tokens.weight"].shape == (1100, 1000)
    for key in whole:
        assert torch.equal(whole[key], blocks[key]), key
    assert m1.get("fractionTaken") == m2.get("fractionTaken")
    assert len(blocks_seen) > 10 and sum(blocks_seen) == 1100  # only the embedding went through blocks


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp",
                                    "model_stock", "arcee_fusion"])
def test_an_empty_tensor_is_carried_through(tmp_path, method):
    """Checkpoints can hold zero-size tensors; no method has anything to compute there."""
    shapes = {"model.embed_tokens.weight": (6, 4), "model.extra.weight": (0, 4)}
    base = random_tensors(shapes, 0)
    write_model(tmp_path / "base", base)
    for seed in (1, 2):
        write_model(tmp_path / f"m{seed}", perturbed(base, seed))
    models = [tmp_path / "m1", tmp_path / "base"] if method in ("slerp", "arcee_fusion") else \
        [tmp_path / "m1", tmp_path / "m2"]
    parameters = {"density": 0.5} if method in ("ties", "dare_ties", "dare_linear") else \
        {"t": 0.5} if method == "slerp" else {}
    m = merge_manifest("m", method, tmp_path / "out", models, base=None if method == "linear" else tmp_path / "base",
                       parameters=parameters)
    code, result = run_merge(tmp_path, m)
    assert code == 0, result
    merged = read_model(tmp_path / "out")
    assert merged["model.extra.weight"].shape == (0, 4) and merged["model.embed_tokens.weight"].shape == (6, 4)


@pytest.mark.parametrize("method", ["ties", "arcee_fusion", "dare_ties"])
def test_several_workers_write_the_same_bytes_as_one(tmp_path, method, monkeypatch):
    """Tensors merged by 3 threads at once, some of them in row blocks, land at their places in several
    shards: the files are byte for byte those of one worker, and the digests taken while writing are the
    files' own."""
    from branchmerge.api.outputs import sha256_file
    from branchmerge.trainer.merge import engine
    monkeypatch.setattr(engine, "BLOCKED_ABOVE_BYTES", 2048)  # the embeddings and mlps go in blocks
    monkeypatch.setattr(engine, "BLOCK_BYTES", 1024)
    base = random_tensors(layer_shapes(hidden=32, vocab=300, layers=6), 0)
    for name, tensors in (("base", base), ("a", perturbed(base, 1)), ("b", perturbed(base, 2))):
        write_model(tmp_path / name, tensors, shards=2)
    models = [tmp_path / "a", tmp_path / "b"]
    parameters = {"density": 0.4} if method != "arcee_fusion" else {}
    anchor = tmp_path / ("b" if method == "arcee_fusion" else "base")  # TinyR1's: the second model is the base
    manifests = {workers: merge_manifest("m", method, tmp_path / f"out{workers}", models, base=anchor,
                                         parameters=parameters, outShardSize="20KB", seed=7)
                 for workers in (1, 3)}
    previous = torch.get_num_threads()
    results = {}
    try:
        for workers, manifest in manifests.items():
            torch.set_num_threads(workers)  # OMP_NUM_THREADS in a pod: the engine's worker count
            code, results[workers] = run_merge(tmp_path, manifest, f"m{workers}")
            assert code == 0, results[workers]
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous
    one, three_ = tmp_path / "out1", tmp_path / "out3"
    assert results[1]["metrics"]["workers"] == 1 and results[3]["metrics"]["workers"] == 3
    manifest_one, manifest_three = read_manifest(one), read_manifest(three_)
    shards = [f for f in manifest_one if f.endswith(".safetensors")]
    assert len(shards) > 3
    for name, digest in manifest_three.items():
        assert digest == sha256_file(three_ / name), name  # hashed while writing, yet the file's digest
        if name != "branchmerge_merge.json":  # provenance records the metrics (elapsed time, workers)
            assert digest == manifest_one[name], name
    for key in ("parameters", "bytesRead", "bytesWritten", "fractionTaken"):
        assert results[1]["metrics"].get(key) == results[3]["metrics"].get(key), key


def test_a_worker_failure_publishes_nothing(tmp_path, three, monkeypatch):
    """One tensor's merge fails while other workers are busy: the stage fails with that error, the other
    workers stop, and neither the output nor its temp folder is left."""
    from branchmerge.trainer.errors import InvalidInput
    from branchmerge.trainer.merge.methods import METHODS
    (base_dir, a_dir, b_dir), _ = three
    module = METHODS["task_arithmetic"]

    def failing(src, real=module.merge_blocks):
        if src.name == "model.layers.1.mlp.up_proj.weight":
            raise InvalidInput(f"{src.name}: cannot merge this one")
        yield from real(src)
    monkeypatch.setattr(module, "merge_blocks", failing)
    monkeypatch.setattr(module, "merge", lambda inputs: module.whole_tensor(failing)(inputs))
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        code, result = run_merge(tmp_path, merge_manifest("m", "task_arithmetic", tmp_path / "out", [a_dir, b_dir],
                                                          base=base_dir))
    finally:
        torch.set_num_threads(previous)
    _assert_failed_cleanly(tmp_path, code, result, "cannot merge this one")


@pytest.mark.parametrize("threads, workers", [(1, 1), (3, 3), (64, 8)])
def test_workers_follow_the_thread_budget_up_to_a_cap(threads, workers):
    """OMP_NUM_THREADS (torch's thread count) sets the workers; a node's 64 cores (no CPU request) do not
    make 64 workers, each of which keeps up to 64 MB of every input mapped."""
    from branchmerge.trainer.merge import engine
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert engine.merge_workers() == workers
    finally:
        torch.set_num_threads(previous)


def test_the_stage_command_ends_its_process_with_the_stage_outcome(tmp_path, three):
    """`branchmerge stage merge` ends its process right after the result (no interpreter teardown): the
    exit code, the result file, the published output and the error message are those of the stage."""
    import subprocess
    import sys
    (base_dir, a_dir, b_dir), _ = three

    def command(manifest, name):
        spec = write_manifest(tmp_path / f"{name}.yaml", manifest)
        out = subprocess.run([sys.executable, "-m", "branchmerge", "stage", "merge", "--spec", str(spec),
                              "--result", str(tmp_path / f"{name}.json")], capture_output=True, text=True,
                             timeout=300)
        return out, json.loads((tmp_path / f"{name}.json").read_text())

    out, result = command(merge_manifest("m", "ties", tmp_path / "out", [a_dir, b_dir], base=base_dir,
                                         parameters={"density": 0.5}), "ok")
    assert out.returncode == 0 and result["phase"] == "Succeeded", out.stderr
    assert read_manifest(tmp_path / "out") == result["files"]
    shard = b_dir / "model-00002-of-00003.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 10)  # found once the merge module runs: the fast exit's path
    shard.write_bytes(bytes(raw))
    out, result = command(merge_manifest("m2", "ties", tmp_path / "out2", [a_dir, b_dir], base=base_dir,
                                         parameters={"density": 0.5}), "bad")
    assert out.returncode == 2 and result["exitCode"] == 2 and not (tmp_path / "out2").exists()
    assert "corrupt safetensors header" in out.stderr.strip().splitlines()[-1]


def test_parameters_an_older_crd_stored_are_accepted_by_every_method(tmp_path, three):
    """The API server stores CRD defaults in the spec. Releases up to 0.1.0 defaulted normalize, lambda,
    rescale and models[].weight for every method, so Merges stored by them carry those values even where
    the method ignores them (arcee_fusion, slerp): they must still run. A value that would change
    something is still rejected."""
    (base_dir, a_dir, b_dir), _ = three
    stored = {"normalize": True, "lambda": 1.0, "rescale": True, "overrides": []}
    for method, models, params in (("arcee_fusion", [a_dir, base_dir], {}), ("slerp", [a_dir, base_dir], {"t": 0.5}),
                                   ("ties", [a_dir, b_dir], {"density": 0.5})):
        doc = merge_manifest("m", method, tmp_path / f"out-{method}", [(m, {"weight": 1.0}) for m in models],
                             base=base_dir, parameters={**stored, **params})
        code, result = run_merge(tmp_path, doc, name=method)
        assert code == 0, result
    doc = merge_manifest("m", "arcee_fusion", tmp_path / "out-bad", [a_dir, base_dir], base=base_dir,
                         parameters={"rescale": False})
    code, result = run_merge(tmp_path, doc, name="bad")
    _assert_failed_cleanly(tmp_path, code, result, "spec.parameters.rescale")


def test_non_finite_metrics_are_reported_as_null(tmp_path, three, monkeypatch):
    """kube-apiserver rejects NaN/Infinity in a request body, so a diverged loss must not reach the CR's
    status as NaN: the result file holds null, the termination message leaves it out, both strict JSON."""
    import branchmerge.trainer.merge.stage as merge_stage

    (base_dir, a_dir, b_dir), _ = three
    real = merge_stage.run
    monkeypatch.setattr(merge_stage, "run", lambda ctx: {**(real(ctx) or {}), "loss": float("nan"),
                                                         "nested": {"x": float("inf")}})
    log = tmp_path / "termination-log"
    monkeypatch.setenv("BRANCHMERGE_TERMINATION_LOG", str(log))
    code, result = run_merge(tmp_path, merge_manifest("m", "linear", tmp_path / "out", [a_dir, b_dir]))
    assert code == 0, result
    assert result["metrics"]["loss"] is None and result["metrics"]["nested"]["x"] is None
    strict = json.loads(log.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the termination message"))
    # the compact message keeps scalars only: an unknown metric is left out
    assert "loss" not in strict["metrics"] and "nested.x" not in strict["metrics"] and strict["phase"] == "Succeeded"


def test_a_failing_rank_other_than_0_reports_its_class(tmp_path, monkeypatch, three):
    """Under torchrun a failing rank makes the launcher kill rank 0 and exit 1: the failing rank's own report
    (termination message, and the result file if rank 0 wrote none) is then the only record of exit 2."""
    (base_dir, a_dir, b_dir), _ = three
    log = tmp_path / "termination-log"
    monkeypatch.setenv("BRANCHMERGE_TERMINATION_LOG", str(log))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    manifest = merge_manifest("m", "linear", tmp_path / "out", [a_dir, tmp_path / "no-such-model"])
    code, result = run_merge(tmp_path, manifest)
    assert code == 2 and result["exitCode"] == 2 and result["rank"] == 1, result
    message = json.loads(log.read_text())
    assert message["exitCode"] == 2 and message["phase"] == "Failed" and message["error"].startswith("rank 1: ")
