"""A JIT-build lock left by a killed process must not hang later runs (trainer/sft/build_locks.py).

Found in CI: one killed SFT process left ``torch_extensions/deepspeed_shm_comm/lock``; every later SFT run
on the machine (the quickstart, the SFT stage tests, the multi-pod test) waited in ``init_distributed``
until its timeout.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from branchmerge.trainer.sft.build_locks import release_stale_locks

from .sft_helpers import make_spec, reasoning_records, run_sft, write_jsonl

OP = "deepspeed_shm_comm"  # the op DeepSpeed's CPU accelerator builds in init_distributed


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_only_a_lock_whose_build_folder_is_idle_is_released(tmp_path):
    idle, busy, fresh = (tmp_path / name for name in ("idle_op", "busy_op", "fresh_op"))
    for folder in (idle, busy, fresh):
        folder.mkdir()
        (folder / "lock").touch()
    (idle / "op.o").touch()
    for path in (idle / "lock", idle / "op.o", busy / "lock"):
        _age(path, 3600)
    (busy / "op.o").touch()  # a live build wrote an object file just now

    removed = release_stale_locks(tmp_path, older_than=600)

    assert removed == [idle / "lock"]
    assert not (idle / "lock").exists() and (busy / "lock").exists() and (fresh / "lock").exists()
    assert release_stale_locks(tmp_path / "absent", older_than=600) == []


def test_the_per_python_folder_of_the_default_root_is_searched(tmp_path):
    lock = tmp_path / "py311_cpu" / "some_op" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    _age(lock, 3600)
    assert release_stale_locks(tmp_path, older_than=600) == [lock]


def test_sft_stage_finishes_despite_a_lock_left_by_a_killed_run(tmp_path, tiny_model, monkeypatch):
    """The real stage process with the op's build folder as a killed run leaves it: it must finish."""
    extensions = tmp_path / "torch_extensions"
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / OP
    if built.is_dir():  # reuse this session's build (mtimes kept) so only the lock differs
        shutil.copytree(built, extensions / OP, ignore=shutil.ignore_patterns("lock"))
    (extensions / OP).mkdir(parents=True, exist_ok=True)
    lock = extensions / OP / "lock"
    lock.touch()
    for path in (extensions / OP).iterdir():
        if path.stat().st_mtime > time.time() - 120:
            _age(path, 120)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.setenv("BRANCHMERGE_BUILD_LOCK_STALE_SECONDS", "60")
    data = write_jsonl(tmp_path / "train.jsonl", reasoning_records(8))
    spec = make_spec(tmp_path / "run", tiny_model, data, training={"epochs": 1})

    code, result, output = run_sft(spec, timeout=420)

    assert code == 0, output[-3000:]
    assert f"removed a stale build lock left by a killed process: {lock}" in output
    assert result["metrics"]["steps"] >= 1
