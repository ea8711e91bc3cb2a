"""The report's decontamination section: the overlap that remained between each published training dataset
and each benchmark of the run, on a workdir written the way the runner leaves one."""
from __future__ import annotations

import json
import re
from pathlib import Path

from branchmerge.report import build_html, decontamination_rows, gather
from branchmerge.operator.local.status_files import StatusFiles
from branchmerge.operator.local.workdir import Workdir

from tests.conftest import manifest

AYA = ("Every morning Aya goes for a 9-kilometer-long walk and stops at a coffee shop afterwards. When she walks "
       "at a constant speed of s kilometers per hour, the walk takes her 4 hours, including t minutes spent in "
       "the coffee shop.")
GAS = "Which of the following gases is the most abundant in the atmosphere of Mars?"


def _record(kind: str, name: str, spec: dict, output: Path | None = None) -> dict:
    status = {"phase": "Succeeded", "attempts": 1, "conditions": [], "metrics": {}}
    if output:
        status["output"] = {"uri": output.as_uri()}
    return manifest(kind, name, spec, status=status)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_overlap_per_training_dataset_and_benchmark(tmp_path):
    bench = _jsonl(tmp_path / "bench" / "aime.jsonl", [{"id": 1, "prompt": AYA}, {"id": 2, "prompt": GAS}])
    other = _jsonl(tmp_path / "bench" / "other.jsonl", [{"id": 1, "prompt": "An unrelated question about ducks."}])
    # a TeacherGen output gated against aime: its prompts are clean, one trace restates a question
    traces = tmp_path / "outputs" / "traces"
    _jsonl(traces / "data.jsonl", [_chat("How many legs has a spider?", "Eight."),
                                   _chat("Name a noble gas.", f"Recall: {GAS} Argon."),
                                   _chat("What is 2+2?", "4")])
    (traces / "_manifest.json").write_text(json.dumps({"files": {}}))
    # BranchSFT data read from a URI, no gate: an exact copy, an 8-gram, a near-duplicate and a clean record
    sft_data = _jsonl(tmp_path / "data" / "mix.jsonl", [
        {"prompt": AYA.upper(), "response": "204"},
        {"prompt": "Tell me which of the following gases is the most abundant on Venus.", "response": "CO2"},
        {"prompt": AYA.replace("in the coffee", "in a coffee"), "response": "204"},
        {"prompt": "How far is the Moon?", "response": "384,400 km"}])
    wd = Workdir.at(tmp_path / "wd")
    store = StatusFiles(wd)
    for doc in [
        _record("TeacherGen", "traces", {"decontaminate": {"benchmarks": [{"uri": bench.as_uri()}]}}, traces),
        _record("BranchSFT", "math", {"base": {"uri": "file:///m"},
                                      "data": [{"from": {"kind": "TeacherGen", "name": "traces"}},
                                               {"uri": sft_data.as_uri()}]}),
        _record("Eval", "bench", {"model": {"from": {"kind": "BranchSFT", "name": "math"}},
                                  "benchmarks": [{"name": "aime", "kind": "math", "dataset": {"uri": bench.as_uri()}},
                                                 {"name": "other", "kind": "math",
                                                  "dataset": {"uri": other.as_uri()}}]}),
    ]:
        store.save(doc)
    data = gather(wd)
    rows = decontamination_rows(data)
    assert rows == [
        ["TeacherGen/traces output", "aime (aime.jsonl)", "yes (n=8)", "3", "0", "0", "0", "1"],
        ["TeacherGen/traces output", "other (other.jsonl)", "no", "3", "0", "0", "0", "0"],
        ["BranchSFT/math spec.data[1]", "aime (aime.jsonl)", "no", "4", "1", "1", "1", "0"],
        ["BranchSFT/math spec.data[1]", "other (other.jsonl)", "no", "4", "0", "0", "0", "0"],
    ]
    html = build_html(data)
    section = html.split("<h2>Decontamination</h2>", 1)[1]
    assert "A gated dataset should show zeros" in section
    cells = re.findall(r'<td class="([^"]*)">([^<]*)</td>', section.split("</table>")[0])
    assert ("num bad", "1") in cells and ("bad", "no") in cells


def test_no_section_without_benchmarks_or_readable_data(tmp_path):
    wd = Workdir.at(tmp_path / "wd")
    store = StatusFiles(wd)
    store.save(_record("BranchSFT", "b", {"base": {"uri": "file:///m"}, "data": [{"uri": "file:///nowhere.jsonl"}]}))
    store.save(_record("Eval", "e", {"model": {"uri": "file:///m"},
                                     "benchmarks": [{"name": "x", "kind": "math",
                                                     "dataset": {"uri": "file:///nowhere/b.jsonl"}}]}))
    data = gather(wd)
    assert decontamination_rows(data) == []
    assert "<h2>Decontamination</h2>" not in build_html(data)
