"""`branchmerge operator` as a process: kubeconfig login, metrics port, kopf liveness endpoint and
peering (leader election) against the emulator."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest

from branchmerge.operator.emulator import Api, EmulatorThread

from testcluster.wait import wait_for

from .emulator_driver import jobs_of, manifest, scrape
from .kube_objects import MERGE_SPEC, NS, cr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubeconfig(path, server: str) -> str:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u", "namespace": NS}}]}))
    return str(path)


@pytest.mark.timeout(120)
def test_cli_operator_with_peering_liveness_and_metrics(tmp_path):
    metrics, liveness = free_port(), free_port()
    with EmulatorThread() as emu:
        api = Api(emu.url)
        api.call("POST", f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings",
                 {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "branchmerge"}})
        proc = subprocess.Popen(
            [sys.executable, "-m", "branchmerge.cli", "operator", "-n", NS,
             "--kubeconfig", kubeconfig(tmp_path / "kubeconfig", emu.url), "--metrics-port", str(metrics),
             "--metrics-addr", "127.0.0.1", "--liveness", f"http://127.0.0.1:{liveness}/healthz",
             "--peering", "branchmerge", "--priority", "7"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "operator.log", "w"))
        try:
            api.create(manifest(cr("Merge", "m", MERGE_SPEC)), NS)
            wait_for(lambda: jobs_of(api, "m"), timeout=60, what="the CLI operator's Job")
            health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=10).read())
            assert "queue_depth" in health
            peering = api.call("GET", f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings/branchmerge")
            peers = list((peering.get("status") or {}).values())
            assert peers and peers[0]["priority"] == 7  # the heartbeat of this replica
            m = scrape(f"http://127.0.0.1:{metrics}/metrics")
            assert m['branchmerge_resources{kind="Merge",phase="Running"}'] == 1
        finally:
            proc.send_signal(2)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print((tmp_path / "operator.log").read_text()[-2000:])
