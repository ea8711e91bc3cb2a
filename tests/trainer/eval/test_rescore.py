"""Re-scoring saved generations (``branchmerge rescore`` and ``Eval.spec.regrade``) on outputs of the real Eval
stage: identical scores with unchanged graders, exactly the expected flips after a grader fix, old files
untouched, old records re-graded from the dataset, bad sources refused, and the Eval option under the local
runner without a model."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import branchmerge.trainer.grading as grading
from branchmerge.api.outputs import MANIFEST, read_manifest, sha256_file
from branchmerge.trainer.eval.passk import pass_at_k
from branchmerge.trainer.eval.rescore import CHANGES, open_source, rescore
from branchmerge.trainer.grading.verdict import Verdict
from branchmerge.trainer.publish import atomic_folder
from branchmerge.trainer.stage import run_stage

from tests.conftest import manifest
from tests.testcluster.apiserver_helpers import call

from .eval_synthetic import benchmarks, copy_data, read_jsonl, write_manifest

SCORE_KEYS = ("pass1", "stderr", "passAtK", "n", "samples", "correct", "meanTokens", "p95Tokens", "truncated",
              "rejected", "reasons")
TINY_LIMIT = 3  # questions per benchmark on the tiny model: enough for every record shape, short on 2 cores


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the rescored/ outputs."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] != "rescored"}


def _scripted_eval(tmp: Path, data_dir: Path, name: str = "scripted") -> Path:
    """The Eval stage against the scripted OpenAI-compatible server (tests/trainer/eval/eval_scripted_server.py)."""
    from .eval_scripted_server import ScriptedServer

    with ScriptedServer() as url:
        engine = {"name": "openai", "endpoint": {"baseUrl": url, "model": "scripted", "maxRetries": 0}}
        out = tmp / "out"
        spec = write_manifest(tmp / "eval.yaml", name, tmp, out, benchmarks(data_dir), engine, code_timeout=2)
        doc = yaml.safe_load(spec.read_text())
        del doc["spec"]["model"]
        spec.write_text(yaml.safe_dump(doc))
        code = run_stage("eval", spec, tmp / "result.json")
    assert code == 0, json.loads((tmp / "result.json").read_text()).get("error")
    return out


def _exact_form_math(real):
    """The grader before a fix: right only when the boxed answer is written exactly like the reference (so
    \\boxed{1.5} fails against \\frac{3}{2}); reasons otherwise as the real grader gives them."""
    def grade_math(response, reference):
        verdict = real(response, reference)
        if verdict.correct and verdict.extracted != str(reference):
            return Verdict(False, "wrong_answer", verdict.extracted)
        return verdict
    return grade_math


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return copy_data(tmp_path_factory.mktemp("rescore-data"))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, data_dir) -> Path:
    """An Eval output graded by today's graders."""
    return _scripted_eval(tmp_path_factory.mktemp("scripted"), data_dir)


@pytest.fixture(scope="module")
def before_fix(tmp_path_factory, data_dir) -> Path:
    """The same Eval graded by the math grader before the fix (the saved texts are the same)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grading, "grade_math", _exact_form_math(grading.grade_math))
        return _scripted_eval(tmp_path_factory.mktemp("before-fix"), data_dir, "before-fix")


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory, tiny_model, data_dir) -> Path:
    """The Eval stage on the tiny model (transformers engine): real model outputs, mostly wrong or truncated."""
    tmp = tmp_path_factory.mktemp("tiny-eval")
    spec = write_manifest(tmp / "eval.yaml", "tiny", tiny_model, tmp / "out", benchmarks(data_dir, limit=TINY_LIMIT),
                          {"name": "transformers", "dtype": "float32"}, max_tokens=24, code_timeout=5)
    code = run_stage("eval", spec, tmp / "result.json")
    assert code == 0, json.loads((tmp / "result.json").read_text()).get("error")
    return tmp / "out"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "branchmerge.cli", "rescore", *args], capture_output=True, text=True,
                          timeout=300)


def _same_scores(old: dict, new: dict) -> None:
    assert new["score"] == old["score"]
    assert list(new["benchmarks"]) == list(old["benchmarks"])
    for name, b in old["benchmarks"].items():
        assert {k: new["benchmarks"][name][k] for k in SCORE_KEYS} == {k: b[k] for k in SCORE_KEYS}, name
        assert new["benchmarks"][name]["changedVerdicts"] == 0


@pytest.mark.parametrize("which", ["tiny_eval", "scripted"])
def test_unchanged_graders_give_identical_scores_and_verdicts(which, request, tmp_path):
    source = request.getfixturevalue(which)
    before = _tree(source)
    results, changes = rescore(open_source(source), tmp_path / "new")
    old = json.loads((source / "results.json").read_text())
    _same_scores(old, results)
    assert changes == [] and read_jsonl(tmp_path / "new" / CHANGES) == []
    assert json.loads((tmp_path / "new" / "results.json").read_text()) == results
    for name in old["benchmarks"]:  # every record as the stage wrote it, verdicts and grading material included
        assert read_jsonl(tmp_path / "new" / "records" / f"{name}.jsonl") == \
            read_jsonl(source / "records" / f"{name}.jsonl")
    assert results["rescore"]["source"] == source.resolve().as_uri()
    assert results["rescore"]["previousScore"] == old["score"]
    assert _tree(source) == before
    assert set(read_manifest(tmp_path / "new")) == {"results.json", "results.md", CHANGES} | {
        f"records/{n}.jsonl" for n in old["benchmarks"]}


def test_a_grader_fix_flips_exactly_the_affected_samples(before_fix, scripted, tmp_path):
    old = json.loads((before_fix / "results.json").read_text())
    math_rows = {r["id"]: r for r in read_jsonl(before_fix / "records" / "math.jsonl")}
    # the Eval graded with the old grader: \boxed{1.5} was wrong against \frac{3}{2}
    assert [s["extracted"] for s in math_rows["math-frac"]["samples"]] == ["1.5", "1.5"]
    assert math_rows["math-frac"]["correct"] == 0
    assert old["benchmarks"]["math"]["pass1"] == pytest.approx(3 / 9)
    before = _tree(before_fix)

    proc = _cli(str(before_fix), "--out", str(tmp_path / "fixed"))
    assert proc.returncode == 0, proc.stderr
    new = json.loads((tmp_path / "fixed" / "results.json").read_text())
    changes = read_jsonl(tmp_path / "fixed" / CHANGES)
    # exactly the two samples of math-frac flipped, to correct
    assert [(c["benchmark"], c["question"], c["sample"]) for c in changes] == [("math", "math-frac", 0),
                                                                                ("math", "math-frac", 1)]
    assert all(c["before"]["correct"] is False and c["after"] == {"correct": True, "reason": "correct",
                                                                   "extracted": "1.5"} for c in changes)
    m = new["benchmarks"]["math"]
    per_question = [1] * 4 + [0] * 5  # math-0, -3, -7 (even A) and now math-frac
    assert m["pass1"] == pytest.approx(4 / 9, abs=1e-6)
    assert m["pass1"] - old["benchmarks"]["math"]["pass1"] == pytest.approx(1 / 9, abs=1e-5)
    assert m["stderr"] == pytest.approx(statistics.stdev(per_question) / math.sqrt(9), abs=1e-6)
    assert m["passAtK"]["2"] == pytest.approx(sum(pass_at_k(2, 2 * c, 2) for c in per_question) / 9, abs=1e-6)
    assert m["correct"] == 8 and m["changedVerdicts"] == 2
    assert m["previous"]["pass1"] == old["benchmarks"]["math"]["pass1"]
    assert new["score"] - old["score"] == pytest.approx((1 / 9) / 3, abs=1e-5)
    for name in ("mcq", "code"):  # untouched graders: the same numbers (code ran in the sandbox again)
        assert {k: new["benchmarks"][name][k] for k in SCORE_KEYS} == \
            {k: old["benchmarks"][name][k] for k in SCORE_KEYS}
    # and the re-graded output is the output today's graders give at generation time
    today = json.loads((scripted / "results.json").read_text())
    for name in today["benchmarks"]:
        assert {k: new["benchmarks"][name][k] for k in SCORE_KEYS} == \
            {k: today["benchmarks"][name][k] for k in SCORE_KEYS}
    assert read_jsonl(tmp_path / "fixed" / "records" / "math.jsonl") == read_jsonl(scripted / "records" / "math.jsonl")
    assert "math" in proc.stdout and "33.3" in proc.stdout and "44.4" in proc.stdout
    score_row = next(line.split() for line in proc.stdout.splitlines() if line.startswith("score "))
    assert score_row[-1] == "2"  # changed verdicts in all
    # the graders' sources are those the Eval recorded (the fix was simulated in-process)
    assert "graders: unchanged" in proc.stdout and new["graders"] == old["graders"] == grading.graders_digest()
    assert _tree(before_fix) == before  # old results untouched


def test_default_output_is_beside_the_old_results(scripted):
    before = _tree(scripted)
    proc = _cli(scripted.as_uri())
    assert proc.returncode == 0, proc.stderr
    (out,) = sorted((scripted / "rescored").iterdir())
    assert read_manifest(out) is not None and (out / "results.json").exists()
    assert _tree(scripted) == before
    # the source still verifies against its own manifest: the rescored/ folder is not part of it
    assert set(read_manifest(scripted)) == set(before) - {MANIFEST}
    shutil.rmtree(scripted / "rescored")


def _republish_as_old(source: Path, dest: Path) -> None:
    """The output as an Eval before records carried grading material (and results.json the field names)."""
    with atomic_folder(dest) as out:
        results = json.loads((source / "results.json").read_text())
        for b in results["benchmarks"].values():
            b.pop("fields")
        results.pop("codeTimeoutSeconds")
        (out / "results.json").write_text(json.dumps(results))
        (out / "records").mkdir()
        for path in (source / "records").glob("*.jsonl"):
            rows = read_jsonl(path)
            for row in rows:
                row.pop("grading")
            (out / "records" / path.name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_old_records_are_regraded_from_the_recorded_dataset(scripted, tmp_path):
    _republish_as_old(scripted, tmp_path / "old")
    results, changes = rescore(open_source(tmp_path / "old"), tmp_path / "new")
    _same_scores(json.loads((scripted / "results.json").read_text()), results)
    # the new records carry the grading material again, as today's stage writes it
    for name in ("math", "mcq", "code"):
        assert read_jsonl(tmp_path / "new" / "records" / f"{name}.jsonl") == \
            read_jsonl(scripted / "records" / f"{name}.jsonl")


def test_old_records_refuse_a_dataset_that_changed(scripted, tmp_path):
    _republish_as_old(scripted, tmp_path / "old")
    data = tmp_path / "math.jsonl"
    rows = read_jsonl(Path(json.loads((scripted / "results.json").read_text())["benchmarks"]["math"]["dataset"]
                           .removeprefix("file://")))
    rows[3]["answer"] = "43"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _cli(str(tmp_path / "old"), "--out", str(tmp_path / "new"), "--dataset", f"math={data}")
    assert proc.returncode == 2
    assert "question 'math-3': the dataset's reference '43' differs from the one the Eval graded against ('42')" \
        in proc.stderr
    assert not (tmp_path / "new").exists()


def test_sources_that_are_not_published_eval_outputs_are_refused(scripted, tmp_path):
    merge_like = tmp_path / "merge"
    with atomic_folder(merge_like) as out:
        (out / "model.safetensors").write_bytes(b"\0" * 8)
    proc = _cli(str(merge_like))
    assert proc.returncode == 2 and "not an Eval output (its manifest lists no results.json)" in proc.stderr
    loose = tmp_path / "loose"
    shutil.copytree(scripted, loose)
    (loose / MANIFEST).unlink()
    proc = _cli(str(loose))
    assert proc.returncode == 2 and "not a published output (no readable _manifest.json)" in proc.stderr
    edited = tmp_path / "edited"
    shutil.copytree(scripted, edited)
    path = edited / "records" / "math.jsonl"
    path.write_text(path.read_text().replace("\\\\boxed{0}", "\\\\boxed{42}"))
    proc = _cli(str(edited))
    assert proc.returncode == 2
    assert f"{path}: differs from the digest in {edited}/_manifest.json" in proc.stderr
    proc = _cli(str(tmp_path / "missing"))
    assert proc.returncode == 2 and "not a folder" in proc.stderr
    assert not any(p.name == "rescored" for p in tmp_path.rglob("*"))


def test_regrade_eval_runs_under_the_local_runner_without_a_model(before_fix, data_dir, tmp_path):
    """A pipeline of two Evals (an endpoint Eval, the Eval re-grading it through from:) and a third re-grading
    the pre-fix output by URI: no model anywhere, the re-grading Evals open no engine."""
    from .eval_scripted_server import ScriptedServer

    folder = tmp_path / "manifests"
    folder.mkdir()

    def eval_doc(name, spec):
        return manifest("Eval", name, spec)

    workdir = tmp_path / "wd"
    with ScriptedServer() as url:
        docs = [
            eval_doc("gen", {"engine": {"name": "openai", "endpoint": {"baseUrl": url, "model": "scripted",
                                                                          "maxRetries": 0}},
                             "benchmarks": benchmarks(data_dir), "codeTimeoutSeconds": 2,
                             "sampling": {"temperature": 0.6, "topP": 0.95, "maxTokens": 64, "seed": 0}}),
            eval_doc("gen-regraded", {"regrade": {"from": {"kind": "Eval", "name": "gen"}}, "codeTimeoutSeconds": 2}),
            eval_doc("fixed", {"regrade": {"uri": before_fix.as_uri()}, "codeTimeoutSeconds": 2,
                               "engine": {"name": "vllm"}}),  # engine settings are ignored when re-grading
        ]
        (folder / "evals.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "run", "-f", str(folder), "--workdir",
                               str(workdir), "--plain"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def output(name):
        status = json.loads((workdir / "status" / "eval" / f"{name}.json").read_text())["status"]
        assert status["phase"] == "Succeeded"
        return Path(status["output"]["uri"].removeprefix("file://")), status["metrics"]

    gen, _ = output("gen")
    regraded, metrics = output("gen-regraded")
    _same_scores(json.loads((gen / "results.json").read_text()), json.loads((regraded / "results.json").read_text()))
    assert metrics["changedVerdicts"] == 0
    fixed, metrics = output("fixed")
    results = json.loads((fixed / "results.json").read_text())
    assert results["name"] == "fixed" and results["rescore"]["sourceName"] == "before-fix"
    assert metrics["changedVerdicts"] == 2 and metrics["benchmarks"]["math"]["pass1"] == pytest.approx(4 / 9, abs=1e-6)
    old = json.loads((before_fix / "results.json").read_text())
    assert metrics["score"] - old["score"] == pytest.approx((1 / 9) / 3, abs=1e-5)
    resolved = (workdir / "runs" / "eval" / "gen-regraded" / "resolved.yaml").read_text()
    assert f"uri: file://{workdir}/outputs/eval/gen" in resolved and "from:" not in resolved
    # nothing was generated: no generation work folder, no generation time
    for path, m in ((regraded, output("gen-regraded")[1]), (fixed, metrics)):
        assert "generationSeconds" not in m and not Path(f"{path}.work").exists()
    assert hashlib.sha256((before_fix / "results.json").read_bytes()).hexdigest() == \
        read_manifest(before_fix)["results.json"]


def test_the_committed_crd_accepts_a_regrade_eval_and_rejects_mixed_ones():
    """The Eval CRD's CEL rules on the API-server stand-in (the committed CRDs): the same verdicts as
    ``branchmerge validate``."""
    from testcluster import ApiError, ApiServer

    from branchmerge.api.validation import InvalidManifest, parse_resource

    def doc(name, **spec):
        return manifest("Eval", name, spec)

    regrade = {"from": {"kind": "Eval", "name": "gen"}}
    bench = [{"name": "m", "kind": "math", "dataset": {"uri": "file:///data/m.jsonl"}}]
    bad = {
        "with-model": (doc("with-model", regrade=regrade, model={"uri": "file:///m"}),
                       "regrade re-grades saved generations without a model: leave model out"),
        "with-gpus": (doc("with-gpus", regrade=regrade, resources={"gpusPerNode": 1}),
                      "regrade runs no model: one pod without GPUs"),
        "both": (doc("both", regrade=regrade, benchmarks=bench),
                 "set exactly one of benchmarks or regrade"),
        "neither": (doc("neither", model={"uri": "file:///m"}), "set exactly one of benchmarks or regrade"),
        "merge-ref": (doc("merge-ref", regrade={"from": {"kind": "Merge", "name": "x"}}), "Eval"),
    }

    with ApiServer(gc="off", seed=7) as server:
        created = call(server.url, "create", "branchmerge.dev/v1alpha1", "evals", "default", doc("ok", regrade=regrade))
        assert created["spec"]["regrade"] == regrade and created["spec"]["resources"]["gpusPerNode"] == 0
        parse_resource(doc("ok", regrade=regrade))
        for name, (rejected, message) in bad.items():
            with pytest.raises(ApiError) as err:
                call(server.url, "create", "branchmerge.dev/v1alpha1", "evals", "default", rejected)
            assert message in str(err.value), (name, str(err.value))
            with pytest.raises(InvalidManifest) as local:
                parse_resource(rejected)
            assert message in str(local.value), name


def test_big_tests_are_saved_as_a_digest_and_read_back_from_the_dataset(tmp_path, data_dir, monkeypatch):
    """Tests too big to copy into a record (LiveCodeBench's reach megabytes) are kept as their digest; re-grading
    reads them from the recorded dataset and refuses a dataset whose tests differ."""
    import branchmerge.trainer.eval.questions as questions

    monkeypatch.setattr(questions, "MAX_INLINE_TESTS", 100)  # every synthetic test list is bigger than this
    (tmp_path / "eval").mkdir()
    source = _scripted_eval(tmp_path / "eval", data_dir)
    rows = read_jsonl(source / "records" / "code.jsonl")
    assert all(set(r["grading"]) <= {"testsDigest", "fnName"} and r["grading"]["testsDigest"].startswith("sha256:")
               for r in rows)
    assert next(r for r in rows if r["id"] == "code-add-fn")["grading"]["fnName"] == "add"
    results, changes = rescore(open_source(source), tmp_path / "new")
    _same_scores(json.loads((source / "results.json").read_text()), results)
    assert read_jsonl(tmp_path / "new" / "records" / "code.jsonl") == rows

    changed = tmp_path / "code.jsonl"
    data = read_jsonl(data_dir / "eval-code.jsonl")
    data[0]["tests"][1]["output"] = "-9\n"
    changed.write_text("".join(json.dumps(r) + "\n" for r in data))
    proc = _cli(str(source), "--out", str(tmp_path / "bad"), "--dataset", f"code={changed}")
    assert proc.returncode == 2
    assert "question 'code-double': the dataset's tests differ from those the Eval graded with" in proc.stderr


def test_a_regrade_eval_exports_its_benchmark_scores_as_gauges():
    """operator/metrics.py: a re-grading Eval lists no benchmarks in its spec; its gauges follow its metrics
    (nested locally, flattened in the termination message on Kubernetes)."""
    from branchmerge.operator.metrics import OperatorMetrics, metric_benchmarks

    assert metric_benchmarks({"benchmarks": {"math": {"pass1": 0.5}, "code": {"pass1": 0.25}}}) == ["math", "code"]
    assert metric_benchmarks({"score": 0.4, "benchmarks.math.pass1": 0.4, "benchmarks.math.n": 9}) == ["math"]
    m = OperatorMetrics(lambda: [])
    m.observe_cr({"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Eval",
                  "metadata": {"name": "fixed", "namespace": "ns"},
                  "spec": {"regrade": {"from": {"kind": "Eval", "name": "gen"}}},
                  "status": {"phase": "Succeeded", "metrics": {"score": 0.6, "benchmarks.math.pass1": 0.444444,
                                                               "benchmarks.mcq.pass1": 0.875}}})
    for bench, value in (("math", 0.444444), ("mcq", 0.875), ("all", 0.6)):
        assert m.registry.get_sample_value("branchmerge_eval_score", {"namespace": "ns", "name": "fixed",
                                                                      "benchmark": bench}) == value


def test_the_operator_gives_a_regrade_eval_a_pod_without_gpus(tmp_path):
    """``branchmerge render`` (the operator's own builders): the generating Eval's Job asks for its GPU, the
    re-grading Eval's for none, and mounts only the claim holding the upstream's output (read) and its own."""
    manifests = [
        {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Eval", "metadata": {"name": "gen"},
         "spec": {"model": {"uri": "pvc://models/m"}, "resources": {"gpusPerNode": 1},
                  "benchmarks": [{"name": "m", "kind": "math", "dataset": {"uri": "pvc://datasets/m.jsonl"}}]}},
        {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Eval", "metadata": {"name": "fixed"},
         "spec": {"regrade": {"from": {"kind": "Eval", "name": "gen"}}}},
    ]
    (tmp_path / "evals.yaml").write_text(yaml.safe_dump_all(manifests))
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "render", "-f", str(tmp_path / "evals.yaml"),
                           "--default-output-root", "pvc://scratch/out", "-o", "json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = json.loads(proc.stdout)["items"]
    jobs = {d["metadata"]["name"].split("-")[0]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Job"}
    gen, fixed = (jobs[n]["containers"][0]["resources"] for n in ("gen", "fixed"))
    assert gen["limits"]["nvidia.com/gpu"] == "1"
    assert not any("gpu" in key for part in fixed.values() for key in part)
    claims = [v["persistentVolumeClaim"] for v in jobs["fixed"].get("volumes", []) if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "scratch", "readOnly": False}]
    resolved = next(yaml.safe_load(next(iter(d["data"].values()))) for d in docs
                    if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("fixed"))
    assert resolved["spec"]["regrade"] == {"uri": "pvc://scratch/out/default/eval/gen"}


def test_validate_accepts_a_pipeline_with_a_regrade_eval(tmp_path):
    """``branchmerge validate`` (schema, CEL, refs, and the decontamination warning's walk over Evals, which
    meets an Eval without benchmarks of its own)."""
    docs = [
        {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Eval", "metadata": {"name": "gen"},
         "spec": {"model": {"uri": "file:///models/m"},
                  "benchmarks": [{"name": "m", "kind": "math", "dataset": {"uri": "file:///data/m.jsonl"}}]}},
        {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Eval", "metadata": {"name": "fixed"},
         "spec": {"regrade": {"from": {"kind": "Eval", "name": "gen"}}}},
    ]
    (tmp_path / "evals.yaml").write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "validate", "-f", str(tmp_path / "evals.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run order: Eval/gen, Eval/fixed" in proc.stdout
