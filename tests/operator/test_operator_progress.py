"""The pods' progress channel: trainer/progress_k8s.StatusSink merge-patches the CR's /status
subresource (here on the emulator, over HTTP), and the stage entry point registers it from the env."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from branchmerge.operator.emulator import Api, EmulatorThread
from branchmerge.trainer.progress import Progress
from branchmerge.trainer.progress_k8s import StatusSink

from opfixtures import MERGE_SPEC, NS, cr
from ophelpers import manifest, wait_for


def test_sink_patches_status_only_and_rate_limits():
    with EmulatorThread() as emu:
        api = Api(emu.url)
        api.create(manifest(cr("Merge", "m", MERGE_SPEC)), NS)
        url = emu.url + Api.path("Merge", NS, "m", "status")
        sink = StatusSink(url, token_file=None, ca_file=None, interval=60.0)
        progress = Progress(path="", min_interval=0.0)
        progress.add_sink(sink)
        progress.update(0.25, "step 1/4", loss=1.5, tokensPerSecond=100.0, note=float("nan"))
        wait_for(lambda: (api.get("Merge", NS, "m").get("status") or {}).get("progress"), what="first patch")
        progress.update(0.5, "step 2/4", loss=1.2)  # within the interval: held back ...
        status = api.get("Merge", NS, "m")["status"]
        assert status["progress"] == {"fraction": 0.25, "message": "step 1/4"}
        assert status["metrics"] == {"loss": 1.5, "tokensPerSecond": 100.0}  # NaN dropped
        progress.update(1.0, "done", loss=0.9)  # ... but the final event goes out at once
        wait_for(lambda: api.get("Merge", NS, "m")["status"]["progress"]["fraction"] == 1.0, what="final patch")
        obj = api.get("Merge", NS, "m")
        assert obj["status"]["metrics"]["loss"] == 0.9 and obj["spec"] == MERGE_SPEC
        assert obj["metadata"]["generation"] == 1  # /status never touches the spec
        assert sink.errors == 0 and sink.sent == 2


def test_sink_failures_never_raise():
    sink = StatusSink("http://127.0.0.1:9/nowhere", token_file="/nonexistent", ca_file=None, interval=0.0,
                      timeout=0.5)
    progress = Progress(path="", min_interval=0.0)
    progress.add_sink(sink)
    progress.update(1.0, "done", force=True)
    sink.flush(5)
    assert sink.errors == 1


def test_stage_entry_reports_through_the_sink_when_enabled(tmp_path):
    """`branchmerge stage` with BRANCHMERGE_K8S_STATUS set: the stage's progress lands in the CR status,
    and the data plane imports neither kubernetes nor kopf. (The merge stage module is replaced by one
    that reports progress and stops: the entry point's wiring is under test, not merging.)"""
    code = textwrap.dedent("""
        import sys, types
        from branchmerge.trainer.errors import InvalidInput
        fake = types.ModuleType("branchmerge.trainer.merge.stage")
        def run(ctx):
            ctx.progress.update(0.5, "half way", force=True, loss=1.25)
            raise InvalidInput("stop here")
        fake.run = run
        sys.modules["branchmerge.trainer.merge.stage"] = fake
        import branchmerge.trainer.stage as stage
        code = stage.run("merge", sys.argv[1])
        assert not [m for m in sys.modules if m.split(".")[0] in ("kubernetes", "kopf")], "data plane imported k8s"
        print("exit", code)
    """)
    spec = tmp_path / "spec.yaml"
    spec.write_text("apiVersion: branchmerge.dev/v1alpha1\nkind: Merge\nmetadata: {name: m}\nspec:\n"
                    "  method: linear\n  models: [{uri: 'file:///nonexistent/a'}]\n"
                    f"  output: {{uri: 'file://{tmp_path}/out'}}\n")
    with EmulatorThread() as emu:
        api = Api(emu.url)
        api.create(manifest(cr("Merge", "m", MERGE_SPEC)), NS)
        env = {"BRANCHMERGE_K8S_STATUS": Api.path("Merge", NS, "m", "status"), "BRANCHMERGE_K8S_SERVER": emu.url,
               "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", code, str(spec)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert "exit 2" in out.stdout, out.stderr[-2000:]
        status = api.get("Merge", NS, "m")["status"]
    assert status["progress"] == {"fraction": 0.5, "message": "half way"} and status["metrics"] == {"loss": 1.25}
