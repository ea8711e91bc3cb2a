"""The progress channel, piece by piece (tests/cluster/test_progress_channel.py runs it end to end):
- the pod's side, trainer/progress_k8s.ReportSink: POSTs rate-limited events with the bound token, re-read
  for each report, and never fails the stage; the stage entry point registers it from the env;
- the operator's side, operator/progress_api.ProgressReceiver, against the API-server stand-in (real
  TokenRequest/TokenReview): a report is accepted only from a pod whose Job is owned, uid by uid, by a
  CR the operator has; it lands in a Running status only for the running attempt's Job."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from branchmerge.operator.kube import KubeClient
from branchmerge.operator.progress_api import ProgressReceiver, Refused, sanitize
from branchmerge.operator.watch_cache import WatchCache
from branchmerge.trainer.progress import Progress
from branchmerge.trainer.progress_k8s import ReportSink
from testcluster.apiserver import ApiServer
from testcluster.client import Client
from testcluster.wait import wait_for


AUDIENCE = "branchmerge.dev/progress"


class Recorder:
    """A plain HTTP endpoint that records what it is sent (the operator's stand-in for the sink's tests)."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                recorder.requests.append((self.path, dict(self.headers), body))
                self.send_response(202)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/progress"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_sink_posts_with_the_current_token_and_rate_limits(tmp_path):
    recorder = Recorder()
    token = tmp_path / "token"
    token.write_text("first-token\n")
    try:
        sink = ReportSink(recorder.url, token_file=str(token), ca_file=None, interval=60.0)
        progress = Progress(path="", min_interval=0.0)
        progress.add_sink(sink)
        progress.update(0.25, "step 1/4", loss=1.5, tokensPerSecond=100.0, note=float("nan"))
        wait_for(lambda: recorder.requests, what="first report")
        progress.update(0.5, "step 2/4", loss=1.2)  # within the interval: held back ...
        token.write_text("rotated-token\n")  # the kubelet rotates the projected token
        progress.update(1.0, "done", loss=0.9)  # ... but the final event goes out at once
        wait_for(lambda: len(recorder.requests) == 2, what="final report")
    finally:
        recorder.close()
    (path1, head1, body1), (_, head2, body2) = recorder.requests
    assert path1 == "/progress" and head1["Authorization"] == "Bearer first-token"
    assert body1 == {"fraction": 0.25, "message": "step 1/4", "metrics": {"loss": 1.5, "tokensPerSecond": 100.0}}
    assert head2["Authorization"] == "Bearer rotated-token" and body2["fraction"] == 1.0
    assert sink.errors == 0 and sink.sent == 2


def test_sink_failures_never_raise():
    sink = ReportSink("http://127.0.0.1:9/nowhere", token_file="/nonexistent", ca_file=None, interval=0.0,
                      timeout=0.5)
    progress = Progress(path="", min_interval=0.0)
    progress.add_sink(sink)
    progress.update(1.0, "done", force=True)
    sink.flush(5)
    assert sink.errors == 1


def test_stage_entry_reports_through_the_sink_when_enabled(tmp_path):
    """`branchmerge stage` with BRANCHMERGE_PROGRESS_URL set reports there, and the data plane imports
    neither kubernetes nor kopf. (The merge stage module is replaced by one that reports progress and
    stops: the entry point's wiring is under test, not merging.)"""
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
        code = stage.run_stage("merge", sys.argv[1])
        assert not [m for m in sys.modules if m.split(".")[0] in ("kubernetes", "kopf")], "data plane imported k8s"
        print("exit", code)
    """)
    spec = tmp_path / "spec.yaml"
    spec.write_text("apiVersion: branchmerge.dev/v1alpha1\nkind: Merge\nmetadata: {name: m}\nspec:\n"
                    "  method: linear\n  models: [{uri: 'file:///nonexistent/a'}]\n"
                    f"  output: {{uri: 'file://{tmp_path}/out'}}\n")
    recorder = Recorder()
    try:
        env = {"BRANCHMERGE_PROGRESS_URL": recorder.url, "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, "-c", code, str(spec)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert "exit 2" in out.stdout, out.stderr[-2000:]
    finally:
        recorder.close()
    assert [body for _, _, body in recorder.requests] == [
        {"fraction": 0.5, "message": "half way", "metrics": {"loss": 1.25}}]


def test_sanitize_bounds_what_a_pod_can_say():
    progress, metrics = sanitize({"fraction": 7, "message": "x" * 1000, "output": {"uri": "pvc://evil"},
                                  "metrics": {"ok": 1.5, "nan": float("nan"), "nested": {"a": 1}, "s": "y" * 999}})
    assert progress == {"fraction": 1.0, "message": "x" * 256}
    assert metrics == {"ok": 1.5, "s": "y" * 256}
    for bad in ([], {"fraction": "half"}, {"metrics": [1]}):
        with pytest.raises(Refused) as err:
            sanitize(bad)
        assert err.value.status == 400


class _Conn:
    """What kopf's login gives the operator's KubeClient, for a plain-HTTP API server."""

    def __init__(self, url):
        self.server = url

    def as_ssl_context(self):
        return None

    def as_http_headers(self):
        return {}


def test_receiver_accepts_only_a_pod_of_a_job_of_the_cr():
    with ApiServer() as server:
        async def main():
            async with Client(server.url) as api:
                await api.create("v1", "namespaces", None, {"metadata": {"name": "ns"}})
                cr = await api.create("v1", "configmaps", "ns", {"metadata": {"name": "stand-in-cr"}})
                cr = {"kind": "Merge", "apiVersion": "branchmerge.dev/v1alpha1",
                      "metadata": {"name": "m", "namespace": "ns", "uid": cr["metadata"]["uid"]}}
                labels = {"app.kubernetes.io/managed-by": "branchmerge-operator", "branchmerge.dev/kind": "Merge",
                          "branchmerge.dev/name": "m", "branchmerge.dev/run": "abc"}
                job = await api.create("batch/v1", "jobs", "ns", {"metadata": {
                    "name": "m-abc-1", "labels": labels,
                    "ownerReferences": [{"apiVersion": "branchmerge.dev/v1alpha1", "kind": "Merge", "name": "m",
                                         "uid": cr["metadata"]["uid"], "controller": True}]},
                    "spec": {"template": {"spec": {"restartPolicy": "Never",
                                                   "containers": [{"name": "stage", "image": "x"}]}}}})

                async def pod(name, owner):
                    body = {"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
                    if owner:
                        body["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job",
                                                                "name": owner["metadata"]["name"],
                                                                "uid": owner["metadata"]["uid"], "controller": True}]
                    made = await api.create("v1", "pods", "ns", body)
                    answer = await api.request("POST", "/api/v1/namespaces/ns/serviceaccounts/default/token", {
                        "spec": {"audiences": [AUDIENCE], "boundObjectRef": {
                            "kind": "Pod", "name": name, "uid": made["metadata"]["uid"]}}})
                    return answer["status"]["token"]

                stage_token, stray_token = await pod("m-abc-1-0", job), await pod("stray", None)
                cache = WatchCache()
                cache.put_cr(cr)
                cache.put_job(job)
                woken = []
                client = KubeClient(lambda: asyncio.sleep(0, _Conn(server.url)))
                receiver = ProgressReceiver(client, cache, woken.append)
                try:
                    key = await receiver.accept(stage_token, {"fraction": 0.5, "message": "half", "metrics": {"x": 1}})
                    assert key == ("ns", "Merge", "m") and woken == [key]
                    with pytest.raises(Refused) as err:
                        await receiver.accept(stray_token, {"fraction": 0.9})
                    assert err.value.status == 403 and "does not belong to a Job" in str(err.value)
                    with pytest.raises(Refused) as err:
                        await receiver.accept("forged.token.x", {"fraction": 0.9})
                    assert err.value.status == 401
                    # the CR was deleted and re-created under the same name: the old Job is not its child
                    cache.put_cr({**cr, "metadata": {**cr["metadata"], "uid": "another-uid", "resourceVersion": "99999"}})
                    receiver._reviews.clear()
                    with pytest.raises(Refused) as err:
                        await receiver.accept(stage_token, {"fraction": 0.9})
                    assert err.value.status == 403
                finally:
                    await client.close()
                # the report lands only in a Running status, and only for the running attempt's Job
                status = {"phase": "Running", "metrics": {"y": 2}}
                receiver.apply(key, status, "m-abc-2")
                assert "progress" not in status
                receiver.apply(key, status, "m-abc-1")
                assert status == {"phase": "Running", "progress": {"fraction": 0.5, "message": "half"},
                                  "metrics": {"y": 2, "x": 1}}
                done = {"phase": "Succeeded"}
                receiver.apply(key, done, "m-abc-1")
                assert done == {"phase": "Succeeded"}
        asyncio.run(main())


def test_a_standby_replica_answers_503():
    """With two replicas the progress Service may route a pod to the standby; it refuses quickly (Retry-After)
    instead of checking against a cache that is not current."""
    import urllib.error
    import urllib.request

    async def main():
        receiver = ProgressReceiver(None, WatchCache(), lambda key: None, acting=lambda: False)
        port = await receiver.start("127.0.0.1", 0)
        try:
            def post():
                req = urllib.request.Request(f"http://127.0.0.1:{port}/progress", data=b"{}", method="POST",
                                             headers={"Authorization": "Bearer x"})
                try:
                    urllib.request.urlopen(req, timeout=5)
                except urllib.error.HTTPError as err:
                    return err.code, err.headers.get("Retry-After")
            return await asyncio.get_running_loop().run_in_executor(None, post)
        finally:
            await receiver.stop()
    assert asyncio.run(main()) == (503, "1")
