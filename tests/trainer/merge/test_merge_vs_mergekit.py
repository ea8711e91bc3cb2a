"""The engine against mergekit itself on the same configs (a tiny Qwen2 model and two fine-tuned variants).

mergekit (LGPL) pins other library versions, so it lives in its own venv: scripts/install.sh creates
``.venv-mergekit`` (or point BRANCHMERGE_MERGEKIT at a ``mergekit-yaml``). Without it these tests skip.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from branchmerge.trainer.stage import run_stage

from tests.conftest import manifest

REPO = Path(__file__).resolve().parents[3]
MERGEKIT = Path(os.environ.get("BRANCHMERGE_MERGEKIT", REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not MERGEKIT.exists(), reason=f"mergekit not installed ({MERGEKIT})")]


def ours(tmp_path: Path, method: str, base: Path | None, models: list[tuple[Path, dict]], parameters: dict) -> dict:
    spec = {"method": method, "models": [{"uri": p.as_uri(), **fields} for p, fields in models],
            "dtype": "float32", "outDtype": "float32", "seed": 0, "parameters": parameters,
            "output": {"uri": (tmp_path / "ours").as_uri()}}
    if base is not None:
        spec["base"] = {"uri": base.as_uri()}
    (tmp_path / "ours.yaml").write_text(yaml.safe_dump(manifest("Merge", "m", spec)))
    assert run_stage("merge", tmp_path / "ours.yaml", tmp_path / "result.json") == 0, (tmp_path / "result.json").read_text()
    return load_file(tmp_path / "ours" / "model.safetensors")


def theirs(tmp_path: Path, config: dict) -> dict:
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump({**config, "dtype": "float32", "out_dtype": "float32"}))
    done = subprocess.run([str(MERGEKIT), str(tmp_path / "mk.yaml"), str(tmp_path / "theirs"), "--no-copy-tokenizer",
                           "--no-write-model-card", "--random-seed", "0", "--quiet"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = {}
    for f in sorted((tmp_path / "theirs").glob("*.safetensors")):
        out |= load_file(f)
    return out


def cases(base: Path, ft1: Path, ft2: Path):
    b, a1, a2 = str(base), str(ft1), str(ft2)
    yield ("linear", None, [(ft1, {"weight": 1.0}), (ft2, {"weight": 3.0})], {},
           {"merge_method": "linear", "models": [{"model": a1, "parameters": {"weight": 1.0}},
                                                 {"model": a2, "parameters": {"weight": 3.0}}]})
    yield ("task_arithmetic", base, [(ft1, {"weight": 0.7}), (ft2, {"weight": 0.4})], {"lambda": 0.9},
           {"merge_method": "task_arithmetic", "base_model": b, "parameters": {"lambda": 0.9},
            "models": [{"model": a1, "parameters": {"weight": 0.7}}, {"model": a2, "parameters": {"weight": 0.4}}]})
    yield ("ties", base, [(ft1, {"weight": 1.0, "density": 0.5}), (ft2, {"weight": 0.5, "density": 0.3})], {},
           {"merge_method": "ties", "base_model": b, "parameters": {"normalize": True},
            "models": [{"model": a1, "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": a2, "parameters": {"weight": 0.5, "density": 0.3}}]})
    for method in ("breadcrumbs", "breadcrumbs_ties"):  # deterministic: largest gamma and smallest dropped
        yield (method, base, [(ft1, {"weight": 1.0, "density": 0.6, "gamma": 0.05}),
                              (ft2, {"weight": 0.5, "density": 0.4, "gamma": 0.1})], {"lambda": 0.9},
               {"merge_method": method, "base_model": b, "parameters": {"lambda": 0.9},
                "models": [{"model": a1, "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.05}},
                           {"model": a2, "parameters": {"weight": 0.5, "density": 0.4, "gamma": 0.1}}]})
    yield ("breadcrumbs_normalized", base, [(ft1, {"weight": 1.0, "density": 0.9}), (ft2, {"weight": 0.5})],
           {"normalize": True, "rescale": True, "density": 0.5, "gamma": 0.3},
           {"merge_method": "breadcrumbs_ties", "base_model": b,
            "parameters": {"normalize": True, "rescale": True, "density": 0.5, "gamma": 0.3},
            "models": [{"model": a1, "parameters": {"weight": 1.0, "density": 0.9}},
                       {"model": a2, "parameters": {"weight": 0.5}}]})
    for topk in (0.4, 1.0):
        yield (f"sce_{topk}", base, [(ft1, {}), (ft2, {})], {"selectTopk": topk},
               {"merge_method": "sce", "base_model": b, "parameters": {"select_topk": topk},
                "models": [{"model": a1}, {"model": a2}]})
    yield ("ties_rescaled", base, [(ft1, {"weight": 1.0, "density": 0.5}), (ft2, {"weight": 0.5, "density": 0.3})],
           {"rescale": True},
           {"merge_method": "ties", "base_model": b, "parameters": {"rescale": True},
            "models": [{"model": a1, "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": a2, "parameters": {"weight": 0.5, "density": 0.3}}]})
    yield ("task_arithmetic_normalized", base, [(ft1, {"weight": 0.7}), (ft2, {"weight": 0.4})],
           {"normalize": True},
           {"merge_method": "task_arithmetic", "base_model": b, "parameters": {"normalize": True},
            "models": [{"model": a1, "parameters": {"weight": 0.7}}, {"model": a2, "parameters": {"weight": 0.4}}]})
    yield ("slerp", ft1, [(ft1, {}), (ft2, {})], {"t": 0.3},
           {"merge_method": "slerp", "base_model": a1, "parameters": {"t": 0.3},
            "models": [{"model": a1}, {"model": a2}]})
    yield ("arcee_fusion", ft2, [(ft1, {}), (ft2, {})], {},
           {"merge_method": "arcee_fusion", "base_model": a2, "models": [{"model": a1}, {"model": a2}]})


CASES = ["linear", "task_arithmetic", "task_arithmetic_normalized", "ties", "ties_rescaled", "breadcrumbs",
         "breadcrumbs_ties", "breadcrumbs_normalized", "sce_0.4", "sce_1.0", "slerp", "arcee_fusion"]


@pytest.mark.parametrize("case", CASES)
def test_same_result_as_mergekit(tmp_path, variants, case):
    (_, base, models, parameters, config), = [c for c in cases(*variants) if c[0] == case]
    method = config["merge_method"]
    mine, reference = ours(tmp_path, method, base, models, parameters), theirs(tmp_path, config)
    assert set(mine) == set(reference)
    # arcee_fusion: mergekit writes base + (other - base) * mask, which can be an ulp away from the other model's
    # value; the engine takes that value exactly. Everything else is float32 arithmetic in another order.
    for name in mine:
        torch.testing.assert_close(mine[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear", "della"])
def test_seeded_methods_keep_what_mergekit_keeps(tmp_path, variants, method):
    """Seeded methods draw other numbers than mergekit's, so the comparison is distributional: the share of
    entries left at the base (dropped by every model) and the L1 norm of the merged task vector agree."""
    base, ft1, ft2 = variants
    fields = {"weight": 1.0, "density": 0.5} | ({"epsilon": 0.2} if method.startswith("della") else {})
    mine = ours(tmp_path, method, base, [(ft1, fields), (ft2, {**fields, "weight": 0.5})], {})
    reference = theirs(tmp_path, {"merge_method": method, "base_model": str(base),
                                  "models": [{"model": str(ft1), "parameters": fields},
                                             {"model": str(ft2), "parameters": {**fields, "weight": 0.5}}]})
    original = load_file(base / "model.safetensors")
    assert set(mine) == set(reference)

    def stats(merged):
        deltas = [merged[n].double() - original[n].double() for n in sorted(original) if merged[n].numel() > 1000]
        at_base = sum(int((d == 0).sum()) for d in deltas) / sum(d.numel() for d in deltas)
        return at_base, sum(float(d.abs().sum()) for d in deltas)

    (ours_at_base, ours_l1), (their_at_base, their_l1) = stats(mine), stats(reference)
    assert abs(ours_at_base - their_at_base) < 0.01, (ours_at_base, their_at_base)  # ~0.25 kept by neither
    assert abs(ours_l1 - their_l1) < 0.02 * their_l1, (ours_l1, their_l1)
