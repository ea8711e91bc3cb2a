"""Every benchmark under bench/ still runs: each ``bench/*.py`` is started with ``--smoke`` (its smallest sizes,
one repeat) and must exit 0. The list is the glob, so a new bench without a ``--smoke`` flag fails here
(argparse exits 2), and a bench that rots (a renamed spec field, a moved function) fails here instead of
being found broken the next time someone wants its numbers. The numbers a smoke run prints mean nothing.

Marked ``slow`` (it still runs in the default ``pytest -q``): the two benches that start a vLLM engine take
about a minute each on 2 CPU cores.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHES = sorted((REPO / "bench").glob("*.py"))
TIMEOUT_S = 600  # per bench; a smoke run takes seconds to about two minutes on a loaded 2-core machine


def test_there_are_benches():
    assert BENCHES, "bench/ holds no benchmark"


@pytest.mark.slow
@pytest.mark.parametrize("bench", BENCHES, ids=lambda p: p.name)
def test_bench_runs_in_smoke_mode(bench, tmp_path):
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(bench), "--smoke"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")[-3000:]
        pytest.fail(f"{bench.name} --smoke ran past {TIMEOUT_S} s:\n{out!s}")
    seconds = time.monotonic() - started
    tail = (proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-4000:]).strip()
    assert proc.returncode == 0, f"{bench.name} --smoke exited {proc.returncode} after {seconds:.0f} s:\n{tail}"
    assert proc.stdout.strip(), f"{bench.name} --smoke printed nothing"
    print(f"{bench.name} --smoke: {seconds:.1f} s")
