"""TAID (adaptive), Sinkhorn and DDK through the real stage: DeepSpeed on CPU (gloo; ZeRO-2, ZeRO-3 for DDK), a tiny
Qwen2 student and a teacher fine-tuned here on one domain (so the teacher-student gap differs between domains)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from branchmerge.trainer.stage import _flat_metrics

from .sft_helpers import make_spec, reasoning_records, run_sft, write_jsonl

pytestmark = pytest.mark.slow


def word_records(n: int, seed: int = 0) -> list[dict]:
    """A second domain unlike the arithmetic traces: lists of letters spelled back."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice("qvzjxkwy") for _ in range(rng.randint(4, 9)))
        out.append({"prompt": f"spell {word}", "response": " ".join(word) + " " + " ".join(reversed(word))})
    return out


@pytest.fixture(scope="module")
def math_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("math") / "math.jsonl", reasoning_records(40, seed=3))


@pytest.fixture(scope="module")
def words_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("words") / "words.jsonl", word_records(40, seed=4))


@pytest.fixture(scope="module")
def math_teacher(tmp_path_factory, tiny_model, math_data) -> Path:
    """The tiny model fine-tuned on the arithmetic traces only."""
    folder = tmp_path_factory.mktemp("teacher")
    spec = make_spec(folder, tiny_model, math_data, training={"epochs": 2, "learningRate": 3e-3})
    code, result, output = run_sft(spec)
    assert code == 0, output[-3000:]
    return folder / "out"


def _kd(teacher: Path, **objective) -> dict:
    return {"type": "kd", "teacher": {"uri": teacher.as_uri()}, **objective}


def test_adaptive_taid_through_the_stage(tmp_path, tiny_model, math_data, math_teacher):
    spec = make_spec(tmp_path, tiny_model, math_data, training={"epochs": 1},
                     objective=_kd(math_teacher, divergence="taid", kdWeight=0.8, taidStart=0.4, taidEnd=0.5,
                                   taidAlpha=0.05, taidBeta=0.9))
    code, result, output = run_sft(spec)
    assert code == 0, output[-3000:]
    m = result["metrics"]
    published = json.loads((tmp_path / "out" / "branchmerge_sft.json").read_text())["taidHistory"]
    ts, objectives = published["t"], published["objective"]
    n = m["steps"]
    assert m["taidSchedule"] == "adaptive" and len(ts) == len(objectives) == n >= 8
    assert ts[0] == 0.4 and m["taidT"] == ts[-1]
    # the paper's rule replayed on the objectives the run measured: t_{k+1} = min(end, max(lin(k+1), t_k + step))
    t, mom, prev = 0.4, 0.0, None
    for k in range(n - 1):
        delta = 0.0 if prev is None else (prev - objectives[k]) / (prev + 1e-8)
        mom, prev = 0.9 * mom + 0.1 * delta, objectives[k]
        low = 0.4 + 0.1 * (k + 1) / (n - 1)
        t = min(0.5, max(low, t + 0.05 / (1 + math.exp(-mom)) * (1 - t)))
        assert ts[k + 1] == pytest.approx(t, abs=2e-6)
        assert low - 1e-6 <= ts[k + 1] <= 0.5
    assert ts[1] > 0.4 + 0.1 / (n - 1) + 1e-3  # adapted: above the linear schedule
    assert all(math.isfinite(x) and x >= 0 for x in objectives)
    assert m["finalLoss"] < m["initialLoss"]


def test_sinkhorn_batch_form_through_the_stage(tmp_path, tiny_model, math_data, math_teacher):
    spec = make_spec(tmp_path, tiny_model, math_data, training={"epochs": 1, "precision": "bf16"},
                     objective=_kd(math_teacher, divergence="sinkhorn", kdWeight=0.5, temperature=2.0,
                                   sinkhornBatchTokens=16, sinkhornEpsilon=0.05, sinkhornIterations=20))
    code, result, output = run_sft(spec)
    assert code == 0, output[-3000:]
    m = result["metrics"]
    assert m["divergence"] == "sinkhorn"
    assert math.isfinite(m["finalDivergence"]) and 0 < m["finalDivergence"] <= 2  # L1 costs: at most 2
    assert m["finalLoss"] < m["initialLoss"]
    history = json.loads((tmp_path / "out" / "branchmerge_sft.json").read_text())["lossHistory"]
    assert all(math.isfinite(x) for x in history)


def test_ddk_moves_weight_to_the_domain_with_the_larger_gap(tmp_path, tiny_model, math_data, words_data,
                                                            math_teacher):
    # ZeRO-3 (the API's default): the validation forwards gather the partitioned weights like the training ones
    spec = make_spec(tmp_path, tiny_model, [math_data, words_data], training={"epochs": 1},
                     deepspeed={"zeroStage": 3},
                     objective=_kd(math_teacher, divergence="forward-kl",
                                   ddk={"everySteps": 3, "smoothing": 0.5, "validationSamples": 6}))
    doc = __import__("yaml").safe_load(spec.read_text())
    doc["spec"]["data"][0]["domain"], doc["spec"]["data"][1]["domain"] = "math", "words"
    # words has its own validation set (5 records); math's 6 are held out of its data
    valid = write_jsonl(tmp_path / "words-valid.jsonl", word_records(5, seed=99))
    doc["spec"]["data"][1]["validation"] = {"uri": valid.as_uri()}
    spec.write_text(__import__("yaml").safe_dump(doc))
    code, result, output = run_sft(spec)
    assert code == 0, output[-3000:]
    m = result["metrics"]
    assert m["domainValidationSamples"] == {"math": 6, "words": 5}
    history = m["domainWeightsHistory"]
    assert [h["step"] for h in history] == list(range(0, m["steps"], 3))
    first = history[0]
    # the teacher knows arithmetic, not spelling: student CE / teacher CE is larger on math
    ratio = {d: first["studentLoss"][d] / first["teacherLoss"][d] for d in ("math", "words")}
    assert ratio["math"] > ratio["words"]
    # from the static mix (training samples per domain), the paper's update by hand from the measured losses
    start = m["domainInitialWeights"]
    assert sum(start.values()) == pytest.approx(1.0, abs=1e-5)
    psi = {d: start[d] * math.exp(ratio[d]) for d in ratio}
    expected = {d: 0.5 * psi[d] / sum(psi.values()) + 0.25 for d in psi}
    assert first["weights"] == pytest.approx(expected, abs=5e-6)
    assert first["weights"]["math"] > start["math"]
    for h in history:
        assert sum(h["weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert m["domainWeights"] == history[-1]["weights"]
    flat = _flat_metrics(m)
    assert flat["domainWeights.math"] == m["domainWeights"]["math"] and "domainWeightsHistory" not in flat
    assert 0.3 < m["packingUtilisation"] <= 1 and 0.3 < m["computeUtilisation"] <= 1  # neat rows dealt by DDK
    assert m["finalLoss"] < m["initialLoss"]


def test_taid_and_ddk_state_resumes_after_a_kill(tmp_path, tiny_model, math_data, words_data, math_teacher):
    """Killed after a checkpoint and rerun: TAID's t trajectory and DDK's weights are those of an uninterrupted
    run (their state is in the checkpoint: t, momentum, J_{n-1}; weights, cursors, deficits, history)."""
    import yaml

    from branchmerge.trainer.sft.checkpoint import checkpoint_root

    from .sft_helpers import kill_after_first_checkpoint

    def spec_in(folder: Path) -> Path:
        spec = make_spec(folder, tiny_model, [math_data, words_data], training={"epochs": 1},
                         checkpointing={"everySteps": 2, "keep": 2},
                         objective=_kd(math_teacher, divergence="taid", kdWeight=0.8, taidStart=0.4, taidEnd=0.5,
                                       taidAlpha=0.05, taidBeta=0.9,
                                       ddk={"everySteps": 3, "smoothing": 0.5, "validationSamples": 4}))
        doc = yaml.safe_load(spec.read_text())
        doc["spec"]["data"][0]["domain"], doc["spec"]["data"][1]["domain"] = "math", "words"
        spec.write_text(yaml.safe_dump(doc))
        return spec

    ref_spec = spec_in(tmp_path / "ref")
    code, ref, output = run_sft(ref_spec)
    assert code == 0, output[-3000:]

    spec = spec_in(tmp_path / "killed")
    root = checkpoint_root(tmp_path / "killed" / "out")
    kill_after_first_checkpoint(spec, tmp_path / "killed" / "result.json", root)
    assert not (tmp_path / "killed" / "out").exists(), "the run finished before it could be killed"
    code, result, output = run_sft(spec)
    assert code == 0, output[-3000:]
    m, r = result["metrics"], ref["metrics"]
    assert m["resumedFromStep"] >= 2 and m["steps"] == r["steps"]
    def taid_t(folder: Path) -> list[float]:
        return json.loads((folder / "out" / "branchmerge_sft.json").read_text())["taidHistory"]["t"]

    assert taid_t(tmp_path / "killed") == pytest.approx(taid_t(tmp_path / "ref"), abs=1e-5)
    assert m["taidT"] == pytest.approx(r["taidT"], abs=1e-5)
    assert [h["step"] for h in m["domainWeightsHistory"]] == [h["step"] for h in r["domainWeightsHistory"]]
    for got, want in zip(m["domainWeightsHistory"], r["domainWeightsHistory"]):
        assert got["weights"] == pytest.approx(want["weights"], abs=1e-4)
    assert m["finalLoss"] == pytest.approx(r["finalLoss"], rel=1e-4)
