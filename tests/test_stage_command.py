"""`branchmerge stage`'s fast exit (branchmerge/commands/stage.py): a stage that declares ENDS_WITHOUT_TEARDOWN
ends the process with its own exit code once the stage returned, after the atexit handlers (the last progress
event, logging) and before the interpreter's teardown."""
import subprocess
import sys

SCRIPT = """
import argparse, atexit, sys, types
import branchmerge.trainer.stage as entry
from branchmerge.commands import stage as command

flag, declared = sys.argv[1], sys.argv[2] == "1"
entry.run = lambda stage, spec, result: 3  # the stage's outcome, its result already written
sys.modules["branchmerge.trainer.merge.stage"] = types.SimpleNamespace(ENDS_WITHOUT_TEARDOWN=declared)
atexit.register(lambda: open(flag, "a").write("atexit "))
code = command.run(argparse.Namespace(stage="merge", spec="unused.yaml", result=None))
open(flag, "a").write("returned ")
sys.exit(code)
"""


def _run(tmp_path, declared: bool):
    flag = tmp_path / f"flag-{declared}"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(flag), "1" if declared else "0"],
                         capture_output=True, text=True, timeout=120)
    return out.returncode, flag.read_text() if flag.exists() else "", out.stderr


def test_a_stage_without_teardown_ends_here_after_the_atexit_handlers(tmp_path):
    code, flag, err = _run(tmp_path, declared=True)
    assert code == 3 and flag == "atexit ", err


def test_other_stages_return_to_the_cli(tmp_path):
    code, flag, err = _run(tmp_path, declared=False)
    assert code == 3 and flag == "returned atexit ", err
