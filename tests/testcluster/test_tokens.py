"""Bound service account tokens on the stand-in: TokenRequest (what the kubelet asks for a projected
``serviceAccountToken`` source) and TokenReview (what the operator's progress endpoint asks), with the
checks a real server makes: signature, expiry, audience, and that the bound pod still exists."""
from __future__ import annotations

import asyncio
import os

import pytest

from testcluster import ApiServer
from testcluster.client import ApiError, Client
from testcluster.kubelet import Node
from testcluster.podnet import PodNetwork

AUDIENCE = "branchmerge.dev/progress"


async def _review(client: Client, token: str, audiences=(AUDIENCE,)) -> dict:
    answer = await client.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                                  {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                   "spec": {"token": token, "audiences": list(audiences)}})
    return answer["status"]


async def _token(client: Client, ns: str, pod: dict, expiration: int = 3600, audience: str = AUDIENCE) -> str:
    answer = await client.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/default/token", {
        "spec": {"audiences": [audience], "expirationSeconds": expiration,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod["metadata"]["name"],
                                    "uid": pod["metadata"]["uid"]}}})
    return answer["status"]["token"]


def test_token_request_and_review():
    with ApiServer() as server:
        async def main():
            async with Client(server.url) as client:
                await client.create("v1", "namespaces", None, {"metadata": {"name": "a"}})
                pod = await client.create("v1", "pods", "a", {"metadata": {"name": "p"}, "spec": {
                    "containers": [{"name": "c", "image": "x"}]}})
                token = await _token(client, "a", pod)
                ok = await _review(client, token)
                assert ok["authenticated"] is True and ok["audiences"] == [AUDIENCE]
                assert ok["user"]["username"] == "system:serviceaccount:a:default"
                assert ok["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["p"]
                assert ok["user"]["extra"]["authentication.kubernetes.io/pod-uid"] == [pod["metadata"]["uid"]]
                # another audience, a forged signature, garbage: not authenticated (200, never an HTTP error)
                assert (await _review(client, token, ["https://kubernetes.default.svc"]))["authenticated"] is False
                head, body, _ = token.split(".")
                assert (await _review(client, f"{head}.{body}.AAAA"))["authenticated"] is False
                assert (await _review(client, "not-a-token"))["authenticated"] is False
                # a token outlives its pod only on paper: once the pod is gone it no longer authenticates
                await client.delete("v1", "pods", "a", "p", grace_seconds=0)
                gone = await _review(client, token)
                assert gone["authenticated"] is False and "not found" in gone["error"]
                # the server's own rules on requests
                with pytest.raises(ApiError) as short:
                    await _token(client, "a", pod | {"metadata": {**pod["metadata"], "name": "q"}})
                assert short.value.status == 404
                pod2 = await client.create("v1", "pods", "a", {"metadata": {"name": "p2"}, "spec": {
                    "containers": [{"name": "c", "image": "x"}]}})
                with pytest.raises(ApiError) as short:
                    await _token(client, "a", pod2, expiration=60)
                assert short.value.status == 422
                with pytest.raises(ApiError) as missing_sa:
                    await client.request("POST", "/api/v1/namespaces/a/serviceaccounts/nobody/token", {"spec": {}})
                assert missing_sa.value.status == 404
        asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="the node's sandbox needs root (mount namespaces)")
def test_kubelet_mounts_a_token_the_server_verifies(tmp_path):
    code = "print(open('/var/run/secrets/branchmerge/token').read())"
    with PodNetwork.create("node-1") as net, ApiServer() as server:
        server.listen(net.gateway)
        with Node(server.url, tmp_path, retry_seconds=0.2, network=net) as node:
            async def main():
                async with Client(server.url) as client:
                    await client.create("v1", "namespaces", None, {"metadata": {"name": "t"}})
                    await client.create("v1", "pods", "t", {
                        "metadata": {"name": "reader"},
                        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                                 "containers": [{"name": "main", "image": "testcluster/python:3.11",
                                                 "command": ["python3", "-c", code],
                                                 "volumeMounts": [{"name": "progress-token", "readOnly": True,
                                                                   "mountPath": "/var/run/secrets/branchmerge"}]}],
                                 "volumes": [{"name": "progress-token", "projected": {"sources": [
                                     {"serviceAccountToken": {"audience": AUDIENCE, "expirationSeconds": 3600,
                                                              "path": "token"}}]}}]}})
                    for _ in range(600):
                        pod = await client.get("v1", "pods", "t", "reader")
                        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                            break
                        await asyncio.sleep(0.05)
                    assert pod["status"]["phase"] == "Succeeded", pod["status"]
                    token = node.logs("t", "reader").strip()
                    review = await _review(client, token)
                    assert review["authenticated"] is True, review
                    assert review["user"]["extra"]["authentication.kubernetes.io/pod-uid"] == [pod["metadata"]["uid"]]
            asyncio.run(main())
