"""The geometric methods (nuslerp, multislerp, karcher, nearswap) against mergekit 0.1.5 itself.

Three levels: whole merges of the tiny model and its variants through the stage and ``mergekit-yaml``
(the harness of test_merge_vs_mergekit); edge cases (colinear, antipodal, zero and tiny norms, 3-D tensors)
through mergekit's own method objects, run in its venv on the same tensors; and the streamed path
(``merge_blocks`` over blocks of rows) against ``merge`` on the whole tensor.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from branchmerge.trainer.errors import InvalidInput
from branchmerge.trainer.merge.methods import karcher, multislerp, nearswap, nuslerp
from branchmerge.trainer.merge.methods.base import MergeInputs, RowBlocks, TensorParams

from .test_merge_vs_mergekit import MERGEKIT, ours, theirs

MODULES = {m.NAME: m for m in (nuslerp, multislerp, karcher, nearswap)}
MERGEKIT_PYTHON = MERGEKIT.parent / "python"
needs_mergekit = pytest.mark.skipif(not MERGEKIT_PYTHON.exists(), reason=f"mergekit not installed ({MERGEKIT})")


# ------------------------------------------------------------------ whole models: the stage vs mergekit-yaml

def cases(base, ft1, ft2):
    """(id, method, base, models with their fields, parameters, mergekit config)."""
    b, a1, a2 = str(base), str(ft1), str(ft2)

    def mk(name, pairs, base_model=None, **parameters):
        config = {"merge_method": name, "models": [{"model": m, **({"parameters": p} if p else {})} for m, p in pairs]}
        if base_model:
            config["base_model"] = base_model
        if parameters:
            config["parameters"] = parameters
        return config

    yield ("nuslerp-flat-base", "nuslerp", base, [(ft1, {"weight": 1.0}), (ft2, {"weight": 3.0})], {},
           mk("nuslerp", [(a1, {"weight": 1.0}), (a2, {"weight": 3.0})], b))
    yield ("nuslerp-rows", "nuslerp", None, [(ft1, {"weight": 1.0}), (ft2, {"weight": 3.0})],
           {"nuslerpFlatten": False},
           mk("nuslerp", [(a1, {"weight": 1.0}), (a2, {"weight": 3.0})], nuslerp_flatten=False))
    yield ("nuslerp-dim0-base", "nuslerp", base, [(ft1, {"weight": 2.0}), (ft2, {"weight": 1.0})],
           {"nuslerpFlatten": False, "nuslerpRowWise": True},
           mk("nuslerp", [(a1, {"weight": 2.0}), (a2, {"weight": 1.0})], b, nuslerp_flatten=False,
              nuslerp_row_wise=True))
    yield ("multislerp-base", "multislerp", base, [(ft1, {"weight": 1.0}), (ft2, {"weight": 2.0})], {},
           mk("multislerp", [(a1, {"weight": 1.0}), (a2, {"weight": 2.0})], b))
    yield ("multislerp-three", "multislerp", None,
           [(base, {"weight": 0.3}), (ft1, {"weight": 0.5}), (ft2, {"weight": 0.4})],
           {"normalizeWeights": False, "eps": 1e-6},
           mk("multislerp", [(b, {"weight": 0.3}), (a1, {"weight": 0.5}), (a2, {"weight": 0.4})],
              normalize_weights=False, eps=1e-6))
    yield ("karcher-base", "karcher", base, [(ft1, {}), (ft2, {})], {"maxIter": 5, "tol": 1e-6},
           mk("karcher", [(a1, None), (a2, None)], b, max_iter=5, tol=1e-6))
    yield ("karcher-three", "karcher", None, [(base, {}), (ft1, {}), (ft2, {})], {},
           mk("karcher", [(b, None), (a1, None), (a2, None)]))
    yield ("nearswap", "nearswap", base, [(base, {}), (ft1, {})], {"t": 0.005},
           mk("nearswap", [(b, None), (a1, None)], b, t=0.005))


CASE_IDS = ["nuslerp-flat-base", "nuslerp-rows", "nuslerp-dim0-base", "multislerp-base", "multislerp-three",
            "karcher-base", "karcher-three", "nearswap"]


@pytest.mark.slow
@pytest.mark.skipif(not MERGEKIT.exists(), reason=f"mergekit not installed ({MERGEKIT})")
@pytest.mark.parametrize("case", CASE_IDS)
def test_same_result_as_mergekit(tmp_path, variants, case):
    (_, method, base, models, parameters, config), = [c for c in cases(*variants) if c[0] == case]
    mine, reference = ours(tmp_path, method, base, models, parameters), theirs(tmp_path, config)
    assert set(mine) == set(reference)
    for name in mine:  # float32 arithmetic in another order (and float64 dot products here)
        torch.testing.assert_close(mine[name], reference[name], rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")


# ------------------------------------------------------------------ edge cases: mergekit's own method objects

# Runs in mergekit's venv: each case's tensors through mergekit's method object for one group.
_MERGEKIT_SCRIPT = r"""
import json, sys
from safetensors.torch import load_file, save_file
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.karcher import karcher_merge_method
from mergekit.merge_methods.multislerp import multislerp
from mergekit.merge_methods.nearswap import nearswap_merge
from mergekit.merge_methods.nuslerp import nuslerp_merge_method
methods = {"nuslerp": nuslerp_merge_method, "multislerp": multislerp, "karcher": karcher_merge_method,
           "nearswap": nearswap_merge}
tensors, spec = load_file(sys.argv[1]), json.load(open(sys.argv[2]))
out = {}
for case in spec:
    inputs = [tensors[f"{case['id']}/{i}"] for i in range(case["count"])]
    if case.get("float64"):
        inputs = [t.double() for t in inputs]
    group = TensorGroup.from_tensors(inputs, base_index=0 if case["base"] else None)
    out[case["id"]] = methods[case["method"]]([group], parameters=case["parameters"])[0].float().contiguous()
save_file(out, sys.argv[3])
"""


def _rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def edge_cases():
    """(id, method, base or None, others, our TensorParams fields, mergekit parameters)."""
    x = _rand((6, 5), 1)
    base3, a3, b3 = _rand((4, 6, 5), 2), _rand((4, 6, 5), 3), _rand((4, 6, 5), 4)
    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        yield (f"nuslerp-3d-{flatten}-{row_wise}", "nuslerp", base3, [a3, b3],
               dict(weights=(1.0, 2.0), nuslerp_flatten=flatten, nuslerp_row_wise=row_wise),
               dict(weight=[1.0, 2.0], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise))
    yield ("nuslerp-1d-rows", "nuslerp", None, [_rand((7,), 5), _rand((7,), 6)],
           dict(weights=(1.0, 1.0), nuslerp_flatten=False), dict(weight=[1.0, 1.0], nuslerp_flatten=False))
    yield ("nuslerp-colinear", "nuslerp", None, [x, 2 * x], dict(weights=(1.0, 3.0)), dict(weight=[1.0, 3.0]))
    yield ("nuslerp-zero-task-vector", "nuslerp", x, [x.clone(), _rand((6, 5), 7)],
           dict(weights=(1.0, 1.0), nuslerp_flatten=False), dict(weight=[1.0, 1.0], nuslerp_flatten=False))
    yield ("nuslerp-zero-weights", "nuslerp", None, [x, _rand((6, 5), 8)], dict(weights=(1.0, -1.0)),
           dict(weight=[1.0, -1.0]))
    yield ("multislerp-antipodal", "multislerp", None, [x, -x], dict(weights=(1.0, 1.0)), dict(weight=[1.0, 1.0]))
    yield ("multislerp-one", "multislerp", _rand((6, 5), 9), [x], dict(weights=(2.0,)), dict(weight=[2.0]))
    yield ("multislerp-four", "multislerp", _rand((6, 5), 10), [_rand((6, 5), s) for s in (11, 12, 13, 14)],
           dict(weights=(0.1, 0.2, 0.3, 0.4)), dict(weight=[0.1, 0.2, 0.3, 0.4]))
    yield ("karcher-zero-base", "karcher", torch.zeros(6, 5), [x, _rand((6, 5), 15)], {}, {})
    yield ("karcher-tiny-norms", "karcher", _rand((6, 5), 16, 1e-8), [_rand((6, 5), 17, 1e-8)], {}, {})
    yield ("karcher-identical", "karcher", x, [x.clone(), x.clone()], {}, {})
    yield ("karcher-one-step", "karcher", x, [_rand((6, 5), 18), _rand((6, 5), 19)], dict(max_iter=1),
           dict(max_iter=1))
    yield ("karcher-antipodal", "karcher", x, [-x], {}, {})
    near = x + _rand((6, 5), 20, 0.01)
    near[0, 0] = x[0, 0]  # an entry equal to the base's
    for t in (0.0, 0.004, 10.0):
        yield (f"nearswap-{t}", "nearswap", x, [near], dict(t=t), dict(t=t))


def mergekit_methods(tmp_path, cases_, float64=False) -> dict:
    """Each case through mergekit's own method object (in its venv), in float64 when asked: {id: result}."""
    tensors, spec = {}, []
    for case_id, method, base, others, _, parameters in cases_:
        inputs = ([base] if base is not None else []) + others
        tensors |= {f"{case_id}/{i}": t.clone().contiguous() for i, t in enumerate(inputs)}
        spec.append({"id": case_id, "method": method, "count": len(inputs), "base": base is not None,
                     "parameters": parameters, "float64": float64})
    save_file(tensors, tmp_path / "in.safetensors")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "run.py").write_text(_MERGEKIT_SCRIPT)
    done = subprocess.run([str(MERGEKIT_PYTHON), str(tmp_path / "run.py"), str(tmp_path / "in.safetensors"),
                           str(tmp_path / "spec.json"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(tmp_path / "out.safetensors")


@needs_mergekit
def test_edge_cases_same_as_mergekit(tmp_path):
    cases_ = list(edge_cases())
    reference = mergekit_methods(tmp_path, cases_)
    for case_id, method, base, others, fields, _ in cases_:
        out = MODULES[method].merge(MergeInputs(case_id, base, others, TensorParams(**fields), torch.Generator()))
        torch.testing.assert_close(out.tensor, reference[case_id], rtol=1e-5, atol=1e-6, msg=case_id)


@needs_mergekit
def test_large_tensor_same_as_mergekit_in_float64(tmp_path):
    """mergekit's float32 sums drift on large tensors (its karcher by 2.5e-5 on an 8M-entry embedding of values
    up to 0.12, against its own float64 run);
    the float64 Gram matrix here agrees with mergekit run in float64."""
    base = _rand((1024, 1024), 50, 0.02)
    a, b = base + _rand((1024, 1024), 51, 0.002), base + _rand((1024, 1024), 52, 0.002)
    cases_ = [("karcher", "karcher", base, [a, b], {}, {}),
              ("multislerp", "multislerp", base, [a, b], dict(weights=(1.0, 2.0)), dict(weight=[1.0, 2.0])),
              ("nuslerp", "nuslerp", base, [a, b], dict(weights=(1.0, 2.0)), dict(weight=[1.0, 2.0]))]
    reference = mergekit_methods(tmp_path, cases_, float64=True)
    for case_id, method, base_, others, fields, _ in cases_:
        out = MODULES[method].merge(MergeInputs(case_id, base_, others, TensorParams(**fields), torch.Generator()))
        torch.testing.assert_close(out.tensor, reference[case_id], rtol=1e-6, atol=1e-8, msg=case_id)


def test_multislerp_antipodal_three_is_an_error():
    x = _rand((6, 5), 1)
    with pytest.raises(InvalidInput, match="tensor w: multislerp"):
        multislerp.merge(MergeInputs("w", None, [x, -x, x * 0 + 1e-12], TensorParams(weights=(1.0, 1.0, 0.0)),
                                     torch.Generator()))


def test_nearswap_needs_t():
    x = _rand((3, 2), 1)
    with pytest.raises(InvalidInput, match="spec.parameters.t"):
        nearswap.merge(MergeInputs("w", x, [x], TensorParams(), torch.Generator()))


def test_nearswap_takes_the_other_value_within_t():
    base = torch.tensor([0.0, 0.0, 0.0, 0.0])
    other = torch.tensor([0.05, -0.1, 0.4, -1.0])
    out = nearswap.merge(MergeInputs("w", base, [other], TensorParams(t=0.1), torch.Generator())).tensor
    # |diff| <= t: the other's value; farther: a share t / |diff| of the way from the base
    torch.testing.assert_close(out, torch.tensor([0.05, -0.1, 0.1, -0.1]))


# ------------------------------------------------------------------ streamed blocks == the whole tensor

def _blocks(name, base, others, params, rows_per_block):
    def load(start, end):
        return (None if base is None else base[start:end]), [o[start:end] for o in others]
    shape = tuple(others[0].shape)
    return RowBlocks(name, shape, rows_per_block, load, params, torch.Generator(), compute_dtype=torch.float32)


def block_cases():
    base, others = _rand((67, 33), 30), [_rand((67, 33), s) for s in (31, 32, 33)]
    close = [base + _rand((67, 33), s, 0.05) for s in (34, 35, 36)]
    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        for b in (base, None):
            yield "nuslerp", b, close[:2], TensorParams(weights=(1.0, 2.5), nuslerp_flatten=flatten,
                                                        nuslerp_row_wise=row_wise)
    b3, o3 = _rand((9, 4, 6), 37), [_rand((9, 4, 6), s) for s in (38, 39)]
    yield "nuslerp", b3, o3, TensorParams(weights=(1.0, 1.0), nuslerp_flatten=False, nuslerp_row_wise=True)
    yield "multislerp", base, close, TensorParams(weights=(1.0, 2.0, 3.0))
    yield "multislerp", None, others, TensorParams(weights=(1.0, 2.0, 3.0), normalize_weights=False)
    yield "karcher", base, others, TensorParams()
    yield "karcher", base, close, TensorParams(max_iter=50, tol=1e-9)
    yield "nearswap", base, close[:1], TensorParams(t=0.03)


@pytest.mark.parametrize("index", range(len(list(block_cases()))))
def test_blocks_equal_whole_tensor(index):
    method, base, others, params = list(block_cases())[index]
    whole = MODULES[method].merge(MergeInputs("w", base, others, params, torch.Generator())).tensor
    src = _blocks("w", base, others, params, rows_per_block=4)
    assert len(list(src.ranges())) > 1
    streamed = src.join(MODULES[method].merge_blocks(src)).tensor
    assert streamed.shape == whole.shape
    if method == "nuslerp" and params.nuslerp_row_wise and not params.nuslerp_flatten:
        # per-column float64 sums added block by block: the same up to float64 rounding
        torch.testing.assert_close(streamed, whole, rtol=1e-6, atol=1e-7)
    else:  # whole-tensor sums are added row by row at the end: bit-identical
        assert torch.equal(streamed, whole)


def test_inputs_are_not_modified():
    base, others = _rand((20, 7), 40), [_rand((20, 7), s) for s in (41, 42, 43)]
    copies = [base.clone()] + [o.clone() for o in others]
    for method, params, n in (("nuslerp", TensorParams(weights=(1.0, 1.0), nuslerp_flatten=False), 2),
                              ("multislerp", TensorParams(weights=(1.0, 1.0, 1.0)), 3),
                              ("karcher", TensorParams(), 3), ("nearswap", TensorParams(t=0.5), 1)):
        MODULES[method].merge(MergeInputs("w", base, others[:n], params, torch.Generator()))
        assert all(torch.equal(a, b) for a, b in zip([base] + others, copies)), method


def test_nuslerp_needs_two_models_besides_the_base():
    x = _rand((3, 2), 1)
    with pytest.raises(InvalidInput, match="spec.models: nuslerp interpolates exactly 2 models"):
        nuslerp.merge(MergeInputs("w", x, [x], TensorParams(weights=(1.0,)), torch.Generator()))
