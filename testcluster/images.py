"""Container images as local Python environments: what each images/<name>/Dockerfile installs, built
into ``.cache/images/<name>/venv`` by replaying the Dockerfile's own build steps.

Build (``python -m testcluster.images build [--only NAME]``): the build stage's instructions are read
from the Dockerfile text (parsed with testcluster/dockerfiles.py) and replayed in order: ``python -m
venv /opt/venv`` creates the env with this machine's Python 3.11, each ``/opt/venv/bin/<tool> ...``
command runs the env's tool with the same arguments (so the extras, pins and the ``pip uninstall`` list
cannot drift from the Dockerfile), ``COPY`` copies the build context (filtered by /.dockerignore) into
``.cache/images/<name>/src``, the ``WORKDIR``. A stamp holding the hash of the Dockerfile and of
pyproject.toml's dependency lists skips the whole dependency build when unchanged.

Project layer (``refresh(name)``): like the image's ``COPY`` + ``pip install .``, the env must hold the
current source: ``refresh`` re-copies the build context and reinstalls just the project
(``--no-deps --force-reinstall``, non-editable) when the context's hash changed (seconds).

Run-time configuration (``config(ref)``): the final stage's ``ENV`` (``PATH`` with the base image's
PATH for ``$PATH``), ``USER``, ``WORKDIR``, ``ENTRYPOINT``/``CMD``, and where the env sits in the image
(``COPY --from=build /opt/venv /opt/venv``): the sandbox bind-mounts the env there.

Not emulated:
- image filesystems and layers: a container's root filesystem is this machine's (see sandbox.py);
- ``apt-get`` steps: system packages come from this machine (not installed; ``system_gaps()`` lists the
  shared libraries an image's ENV names that are missing here, e.g. tcmalloc: LD_PRELOAD is dropped);
- the base image's Python: the envs are made from this machine's Python 3.11 that non-root users can run
  (Debian's /usr/bin/python3.11, 3.11.2, not 3.11.14), and its ENV beyond PATH and LANG;
- ``--extra-index-url`` (no internet: pip's configured local index and find-links serve the same pins),
  ``PIP_NO_CACHE_DIR`` (pip's cache is reused on purpose: a build takes minutes, not tens of them);
- the CUDA image (images/trainer): it cannot be built on a CPU machine without CUDA; its references are
  unknown here (the kubelet answers ErrImagePull) unless a test maps them to trainer-cpu;
- registries: any tag or digest of a known repository resolves to the same env; ``imagePullPolicy`` is
  not consulted.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import dockerfiles as D

REPO = Path(__file__).resolve().parent.parent
IMAGES_DIR = REPO / "images"
CACHE = Path(os.environ.get("TESTCLUSTER_IMAGES", REPO / ".cache" / "images"))
REGISTRY = "ghcr.io/branchmerge"
# Images that need hardware this machine lacks (CUDA devel base, flash-attention build).
UNBUILDABLE = {"trainer": "a CUDA image (nvidia/cuda devel base, flash-attn): not buildable without CUDA"}
# The tiny "busybox"-like image for fast tests: the system Python, no packages beyond Debian's.
SYSTEM_PYTHON = "testcluster/python:3.11"
# PATH of the base images (docker inspect): $PATH in the Dockerfiles' ENV lines expands to it.
BASE_ENV = {
    "python": {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8"},
    "nvidia/cuda": {"PATH": "/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:"
                            "/usr/sbin:/usr/bin:/sbin:/bin"},
}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BuildError(RuntimeError):
    pass


def _world_usable(path: str) -> bool:
    """Every folder on the way traversable and the file executable by any user: the images run as
    non-root users (pyenv's Python under /root is not usable by them)."""
    real = Path(os.path.realpath(path))
    if not real.is_file() or not os.stat(real).st_mode & 0o001:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in real.parents)


def base_python() -> str:
    """The Python 3.11 the envs are made from (the images' base is python:3.11): $TESTCLUSTER_PYTHON, else
    the first 3.11 on this machine that every user can run."""
    candidates = [os.environ.get("TESTCLUSTER_PYTHON"), "/usr/bin/python3.11", "/usr/local/bin/python3.11",
                  getattr(sys, "_base_executable", None), sys.executable]
    for candidate in candidates:
        if candidate and _world_usable(candidate):
            return candidate
    raise BuildError("no Python 3.11 usable by non-root users (set TESTCLUSTER_PYTHON)")


@dataclass(frozen=True)
class ImageConfig:
    """What a container of this image starts with (the OCI image config)."""

    name: str
    env: dict[str, str]
    user: str | None = None            # "uid[:gid]" as in USER; None: root
    workdir: str = "/"
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    venv: Path | None = None           # the local env holding the image's Python packages
    venv_mount: str | None = None      # where the image has it (bind-mounted there by the sandbox)
    dropped: dict[str, str] = field(default_factory=dict)  # ENV entries left out here, with why

    def argv(self, command: list[str] | None, args: list[str] | None) -> list[str]:
        """The process a container runs: ``command`` replaces ENTRYPOINT (and drops CMD), ``args``
        replace CMD -- Kubernetes' rules for a container's command and args."""
        if command:
            return [*command, *(args or [])]
        return [*(self.entrypoint or []), *(args if args else (self.cmd or []))]

    def mounts(self) -> list[tuple[str, str]]:
        """(host env folder, path in the image) for the sandbox to bind (read-only: it is shared). pip wrote
        the env's host path into its scripts' shebangs, so the env is bound at that path too: a pod's volume
        may hide it otherwise (a checkout under /tmp, where every stage pod mounts its own emptyDir)."""
        if not (self.venv and self.venv_mount):
            return []
        return [(str(self.venv), self.venv_mount)] + \
            ([(str(self.venv), str(self.venv))] if str(self.venv) != self.venv_mount else [])

    @property
    def uid_gid(self) -> tuple[int, int | None]:
        if not self.user:
            return 0, None
        user, _, group = self.user.partition(":")
        uid = 0 if user == "root" else int(user)  # names other than root: not resolved (images use numbers)
        return uid, (int(group) if group else None)


# ---- Dockerfiles ----------------------------------------------------------------------------------------

def names() -> list[str]:
    return sorted(p.parent.name for p in IMAGES_DIR.glob("*/Dockerfile"))


def buildable() -> list[str]:
    return [n for n in names() if n not in UNBUILDABLE]


def _stages(name: str) -> list[D.Stage]:
    return D.stages((IMAGES_DIR / name / "Dockerfile").read_text(encoding="utf-8"))


def image_dir(name: str) -> Path:
    return CACHE / name


def venv_dir(name: str) -> Path:
    return image_dir(name) / "venv"


def repository(ref: str) -> str:
    """``ghcr.io/branchmerge/operator:0.1.0@sha256:..`` -> ``ghcr.io/branchmerge/operator``."""
    ref = ref.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    return ref[:colon] if colon > slash else ref


def image_name(ref: str) -> str | None:
    """The images/<name> folder a reference points at, or None for other repositories."""
    repo = repository(ref)
    if repo.startswith(REGISTRY + "/"):
        name = repo[len(REGISTRY) + 1:]
        return name if name in names() else None
    return None


def _env_lines(stage: D.Stage) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for ins in stage.all("ENV"):
        for token in shlex.split(ins.value):
            if "=" in token:
                key, value = token.split("=", 1)
                pairs.append((key, value))
    return pairs


def _base_env(base: str) -> dict[str, str]:
    for prefix, env in BASE_ENV.items():
        if base.startswith(prefix):
            return dict(env)
    return {"PATH": DEFAULT_PATH}


def system_gaps(name: str) -> dict[str, str]:
    """ENV entries of the final stage that name files missing on this machine (they are dropped)."""
    final = _stages(name)[-1]
    gaps = {}
    for key, value in _env_lines(final):
        if key == "LD_PRELOAD":
            missing = [p for p in value.split(":") if p and not Path(p).exists()]
            if missing:
                gaps[key] = f"{', '.join(missing)} is not installed on this machine (an apt-get step of the image)"
    return gaps


def config(ref_or_name: str) -> ImageConfig:
    """The run-time configuration of an image (by reference, ``images/`` folder name or SYSTEM_PYTHON)."""
    if repository(ref_or_name) == repository(SYSTEM_PYTHON):
        return ImageConfig(name=SYSTEM_PYTHON, env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}, cmd=["python3"])
    name = image_name(ref_or_name) or ref_or_name
    if name not in names():
        raise KeyError(ref_or_name)
    final = _stages(name)[-1]
    env = _base_env(final.base)
    dropped = system_gaps(name)
    for key, value in _env_lines(final):
        value = final.expand(value).replace("$PATH", env.get("PATH", DEFAULT_PATH))
        if key not in dropped:
            env[key] = value
    user = final.all("USER")[-1].value if final.all("USER") else None
    workdir = final.all("WORKDIR")[-1].value if final.all("WORKDIR") else "/"
    mount = None
    for ins in final.all("COPY"):
        words = ins.value.split()
        if words and words[0].startswith("--from="):
            mount = words[-1]  # COPY --from=build /opt/venv /opt/venv: the env's place in the image
    return ImageConfig(name=name, env=env, user=user, workdir=workdir,
                       entrypoint=D.exec_form(final, "ENTRYPOINT"), cmd=D.exec_form(final, "CMD"),
                       venv=venv_dir(name), venv_mount=mount, dropped=dropped)


# ---- build context ----------------------------------------------------------------------------------------

def _context_files() -> list[Path]:
    """Files of the build context (/.dockerignore applied), relative to the repository."""
    included = D.dockerignore((REPO / ".dockerignore").read_text(encoding="utf-8"))
    out = []
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO)
        # prune excluded folders (the venvs, .git, caches): this .dockerignore re-includes only top-level
        # entries, so nothing under an excluded folder can come back
        dirs[:] = [d for d in dirs if included(str(rel_root / d))]
        for f in files:
            rel = rel_root / f
            if included(str(rel)):
                out.append(rel)
    return sorted(out)


def context_hash() -> str:
    h = hashlib.sha256()
    for rel in _context_files():
        h.update(str(rel).encode() + b"\0" + (REPO / rel).read_bytes() + b"\0")
    return h.hexdigest()


def _copy(stage_value: str, workdir: Path) -> None:
    """``COPY src... dest`` from the build context (a folder source copies its contents, as Docker)."""
    words = shlex.split(stage_value)
    sources, dest = words[:-1], words[-1]
    files = _context_files()
    target = workdir / dest
    for src in sources:
        matched = [f for f in files if Path(f).match(src) and len(Path(f).parts) == 1]
        under = [f for f in files if f.parts[0] == src.rstrip("/") and len(f.parts) > 1]
        if under:  # a folder: its contents into dest
            for f in under:
                out = target / Path(*f.parts[1:])
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, out)
        elif matched:
            target.mkdir(parents=True, exist_ok=True)
            for f in matched:
                shutil.copy2(REPO / f, target / f.name)
        elif "*" not in src:
            raise BuildError(f"COPY {src}: not in the build context")


# ---- build ------------------------------------------------------------------------------------------------

def dependency_hash(name: str) -> str:
    """What the dependency build depends on: the Dockerfile and pyproject's dependency lists."""
    with open(REPO / "pyproject.toml", "rb") as fh:
        doc = tomllib.load(fh)
    project = doc["project"]
    deps = {"build": doc.get("build-system", {}), "dependencies": project.get("dependencies", []),
            "optional": project.get("optional-dependencies", {})}
    text = (IMAGES_DIR / name / "Dockerfile").read_text(encoding="utf-8")
    return hashlib.sha256((text + json.dumps(deps, sort_keys=True) + base_python()).encode()).hexdigest()


@contextmanager
def _locked(name: str):
    """One builder per image at a time (parallel test processes may call refresh together)."""
    image_dir(name).mkdir(parents=True, exist_ok=True)
    with open(image_dir(name) / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _translate(words: list[str], venv: Path, mount: str) -> list[str] | None:
    """One build command of the Dockerfile as run here; None for steps that are skipped (apt)."""
    env_prefix = []
    while words and "=" in words[0] and not words[0].startswith(("/", "-")):
        env_prefix.append(words.pop(0))
    # `> /dev/null`: output goes to the build log anyway
    cleaned, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in (">", "2>", ">>"):
            skip = True
        elif not w.startswith(">"):
            cleaned.append(w)
    words = cleaned
    if not words:
        return None
    if words[0] == "cd" and len(words) == 2:
        return ["cd", words[1]]
    if words[0] in ("apt-get", "rm") and (words[0] == "apt-get" or "/var/lib/apt/lists/*" in words):
        return None
    if words[0].startswith("python") and words[1:3] == ["-m", "venv"] and words[3:] == [mount]:
        return [*env_prefix, base_python(), "-m", "venv", str(venv)]
    if words[0].startswith(mount + "/bin/"):
        args, out, skip = words[1:], [], False
        for w in args:  # no internet here: pip's configured local index serves the same pins
            if skip:
                skip = False
            elif w == "--extra-index-url":
                skip = True
            elif not w.startswith("--extra-index-url="):
                out.append(w)
        return [*env_prefix, str(venv / "bin" / words[0][len(mount + "/bin/"):]), *out]
    raise BuildError(f"unsupported build step (teach testcluster/images.py): {shlex.join(words)}")


def _run(argv: list[str], cwd: Path, env: dict[str, str], logfile) -> None:
    assigns = {}
    while argv and "=" in argv[0] and not argv[0].startswith("/"):
        key, value = argv.pop(0).split("=", 1)
        assigns[key] = value
    logfile.write(f"$ {shlex.join(argv)}\n")
    logfile.flush()
    proc = subprocess.run(argv, cwd=cwd, env={**env, **assigns}, stdout=logfile, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise BuildError(f"{shlex.join(argv)} exited {proc.returncode} (log: {logfile.name})")


def _build_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "PIP_NO_CACHE"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def build(name: str, *, force: bool = False, quiet: bool = False) -> Path:
    """Build (or keep) the image's env; always leaves the project layer current. Returns the venv."""
    if name in UNBUILDABLE:
        raise BuildError(f"{name}: {UNBUILDABLE[name]}")
    stages = _stages(name)
    build_stage = stages[0] if len(stages) > 1 else stages[-1]
    mount = config(name).venv_mount or "/opt/venv"
    venv = venv_dir(name)
    stamp = image_dir(name) / "deps.sha256"
    with _locked(name):
        wanted = dependency_hash(name)
        if not force and venv.exists() and stamp.exists() and stamp.read_text() == wanted:
            if not quiet:
                print(f"{name}: dependencies up to date ({venv})")
        else:
            shutil.rmtree(venv, ignore_errors=True)
            stamp.unlink(missing_ok=True)
            src = image_dir(name) / "src"
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir(parents=True)
            cwd = image_dir(name)
            env = _build_env()
            with open(image_dir(name) / "build.log", "w") as log:
                if not quiet:
                    print(f"{name}: building {venv} (log: {log.name})", flush=True)
                for ins in build_stage.instructions:
                    if ins.keyword == "WORKDIR":
                        cwd = src  # the build context's home (/src in the image)
                    elif ins.keyword == "COPY":
                        _copy(ins.value, cwd)
                    elif ins.keyword == "RUN":
                        here = cwd  # a `cd` lasts for the rest of its RUN line, as in the shell
                        for command in build_stage.expand(ins.value).split("&&"):
                            argv = _translate(shlex.split(command), venv, mount)
                            if argv is None:
                                continue
                            if argv[0] == "cd":
                                here = src if argv[1] == "/src" else Path(argv[1])
                            else:
                                _run(argv, here, env, log)
            stamp.write_text(wanted)
            (image_dir(name) / "source.sha256").write_text(context_hash())
        _refresh_locked(name, quiet=quiet)
    return venv


_refreshed: set[str] = set()


def refresh(name: str, *, quiet: bool = True) -> Path:
    """Make the env's installed project the current source (the image's COPY + ``pip install .``);
    a no-op when the build context is unchanged since the last install. Once per process and image."""
    venv = venv_dir(name)
    if name in _refreshed:
        return venv
    if not venv.exists():
        raise BuildError(f"{name}: no env at {venv}: run `python -m testcluster.images build --only {name}`")
    with _locked(name):
        _refresh_locked(name, quiet=quiet)
    _refreshed.add(name)
    return venv


def is_built(name: str) -> bool:
    """A completed build (its stamp written) whose env is still there."""
    return venv_dir(name).exists() and (image_dir(name) / "deps.sha256").exists()


def _refresh_locked(name: str, *, quiet: bool) -> None:
    marker = image_dir(name) / "source.sha256"
    current = context_hash()
    if marker.exists() and marker.read_text() == current:
        return
    src = image_dir(name) / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for ins in _stages(name)[0].all("COPY"):
        _copy(ins.value, src)
    with open(image_dir(name) / "refresh.log", "w") as log:
        _run([str(venv_dir(name) / "bin" / "pip"), "install", "--no-deps", "--force-reinstall",
              "--no-build-isolation", "-q", "."], src, _build_env(), log)
    marker.write_text(current)
    if not quiet:
        print(f"{name}: project reinstalled from the current source")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testcluster.images", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the image environments under .cache/images/")
    b.add_argument("--only", action="append", choices=names(), help="just this image (repeatable)")
    b.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    sub.add_parser("list", help="the images and where their envs are")
    args = parser.parse_args(argv)
    if args.command == "list":
        for n in names():
            print(f"{n}\t{UNBUILDABLE.get(n) or venv_dir(n)}")
        return 0
    for n in args.only or buildable():
        if n in UNBUILDABLE:
            print(f"{n}: skipped: {UNBUILDABLE[n]}", file=sys.stderr)
            continue
        build(n, force=args.force)
        for key, why in system_gaps(n).items():
            print(f"{n}: note: ENV {key} dropped: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
