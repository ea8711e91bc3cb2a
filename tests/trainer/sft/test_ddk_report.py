"""`branchmerge report` shows the DDK weights over time of a BranchSFT that used DDK (and nothing for one that did not)."""
from __future__ import annotations

import json

from branchmerge.report import build_html, domain_weights_section, gather
from branchmerge.operator.local.status_files import StatusFiles
from branchmerge.operator.local.workdir import Workdir

from tests.conftest import manifest


def _record(name: str) -> dict:
    return manifest("BranchSFT", name, {"base": {"uri": "file:///m"}, "data": [{"uri": "file:///a.jsonl"}]},
                    status={"phase": "Succeeded", "attempts": 1, "conditions": [], "metrics": {}})


def test_domain_weights_section(tmp_path):
    wd = Workdir.at(tmp_path / "wd")
    store = StatusFiles(wd)
    history = [{"step": 0, "weights": {"math": 0.7, "words": 0.3}, "studentLoss": {"math": 5.0, "words": 5.1},
                "teacherLoss": {"math": 1.0, "words": 4.0}},
               {"step": 3, "weights": {"math": 0.8123, "words": 0.1877}, "studentLoss": {"math": 4.0, "words": 4.9},
                "teacherLoss": {"math": 1.0, "words": 4.0}}]
    for name, metrics in [("mixed", {"domainWeightsHistory": history, "domainInitialWeights": {"math": 0.5,
                                                                                               "words": 0.5}}),
                          ("plain", {"finalLoss": 1.0})]:
        store.save(_record(name))
        wd.result_file(f"BranchSFT/{name}").parent.mkdir(parents=True, exist_ok=True)
        wd.result_file(f"BranchSFT/{name}").write_text(json.dumps({"phase": "Succeeded", "metrics": metrics}))
    data = gather(wd)
    section = domain_weights_section(data)
    assert section.count("<h3>") == 1 and "mixed" in section and "plain" not in section
    assert ">0.8123</td>" in section and "weight (step 3)" in section and "data:image/png;base64," in section
    page = build_html(data)
    assert "Domain weights (DDK)" in page
