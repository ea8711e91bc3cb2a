"""Layout guarantees: operator/ never shadows the standard library, and the API imports nothing heavy."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_operator_folder_does_not_shadow_stdlib_operator():
    # run from the repository root, where `operator/` is a folder in the current directory
    path = _python("import operator; print(operator.__file__)")
    assert not path.startswith(str(REPO)), path
    assert _python("import branchmerge.operator, operator; print(operator.itemgetter(1)([0, 7]))") == "7"
    # `python -m` imports runpy -> collections -> operator with the checkout first on sys.path
    out = subprocess.run([sys.executable, "-m", "timeit", "-n", "1", "pass"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_api_and_cli_do_not_import_ml_or_kube_libraries():
    mods = _python("import sys, branchmerge.cli, branchmerge.api.manifests, branchmerge.api.crdgen;"
                   "branchmerge.cli.build_parser();"
                   "print(' '.join(m for m in ('torch', 'vllm', 'deepspeed', 'kopf', 'kubernetes', 'transformers')"
                   " if m in sys.modules))")
    assert mods == ""


def test_plain_wheel_maps_every_folder_into_the_namespace(tmp_path):
    """`pip install .` (not editable) ships every module of api/, operator/, trainer/ under branchmerge.*."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("branchmerge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, package in (("api", "branchmerge/api"), ("operator", "branchmerge/operator"),
                            ("trainer", "branchmerge/trainer"), ("branchmerge", "branchmerge")):
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                expected.add(f"{package}/{path.relative_to(REPO / folder).as_posix()}")
    assert expected - names == set()
    assert not any(n.startswith(("operator/", "api/", "trainer/")) for n in names)
