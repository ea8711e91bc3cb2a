"""Test-wide environment and shared fixtures.

The environment is set before anything imports torch, deepspeed or vllm (ENVIRONMENT.md): CPU accelerator,
one OpenMP thread per process (2 cores), offline hubs, a small vLLM KV cache, and a persistent cache for
DeepSpeed's JIT-compiled ops so they are built once per virtual environment.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BRANCHMERGE_TEST_CACHE", REPO / ".cache"))
# One build folder per virtual environment: op builds embed the venv's include paths, so two checkouts
# sharing one folder would rebuild over each other's ops (and contend for one build lock).
VENV_KEY = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]

for key, value in {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": str(CACHE / "torch_extensions" / VENV_KEY),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Qwen2 model folder (float32, untied), built once per test session."""
    from branchmerge.trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def tiny_vllm(tiny_model):
    """ONE offline vLLM engine (branchmerge.trainer.engine) on the tiny model for the whole session (~30 s start).

    Its raw ``vllm.LLM`` is ``tiny_vllm.llm`` and its tokenizer ``tiny_vllm.tokenizer``.
    """
    from branchmerge.api.common import Engine
    from branchmerge.trainer.engine import open_engine

    engine = open_engine(Engine(name="vllm", dtype="float32", enforce_eager=True, max_model_len=1024), tiny_model)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def reduced_quickstart(tmp_path_factory) -> tuple[Path, object]:
    """``branchmerge quickstart --size reduced`` run once per session (about 2.5 min): (its folder, the
    finished process). tests/local checks the run itself; tests/cluster runs the same manifests through
    the operator on the stand-in cluster and compares the outputs' digests with this run's."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("quickstart") / "qs"
    proc = subprocess.run([sys.executable, "-m", "branchmerge.cli", "quickstart", str(root), "--size", "reduced",
                           "--plain"], capture_output=True, text=True, timeout=900)
    return root, proc


# What a stage writes about its own run (timings, input URIs) next to what it made: these differ between
# any two runs by design; everything else an output holds must not.
RUN_RECORDS = {"branchsft": ("branchmerge_sft.json",), "merge": ("branchmerge_merge.json",),
               "teachergen": ("teachergen.json",), "eval": ("results.json", "results.md")}


@pytest.fixture(scope="session")
def output_content():
    """``content(folder)``: the file digests of a published output without its run records (file name ->
    sha256): equal for two runs that made the same thing."""
    from branchmerge.api.outputs import read_manifest

    records = {name for names in RUN_RECORDS.values() for name in names}

    def content(folder: Path) -> dict[str, str]:
        files = read_manifest(folder)
        assert files is not None, f"{folder}: not published"
        return {path: digest for path, digest in files.items() if path.split("/")[-1] not in records}

    return content



# ---- manifests ----------------------------------------------------------------------------------------
# One envelope for every branchmerge document a test writes, so a change of the API version or of what a
# manifest must carry is made here once. Plain functions, not fixtures: tables of cases are built from
# them when the tests are collected (import them as ``from tests.conftest import manifest``).
API_VERSION = "branchmerge.dev/v1alpha1"


def manifest(kind: str, name: str, spec: dict, *, metadata: dict | None = None, **fields) -> dict:
    """A document as a user writes it; ``metadata`` adds to the name (labels, what a server sets) and
    ``fields`` to the top level (``status`` for what a status files holds)."""
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, **(metadata or {})}, "spec": spec,
            **fields}
