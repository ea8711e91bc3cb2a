"""Shared bits of the API-server stand-in tests: a blocking way to run the asyncio client, raw HTTP
requests, the committed CRDs and examples, and polling from asyncio code."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import yaml

from testcluster import Client

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
MERGES = "branchmerge.dev/v1alpha1"


def run(coro):
    return asyncio.run(coro)


def call(url: str, method: str, *args, **kwargs):
    """One Client call, blocking: call(url, "create", "v1", "configmaps", "default", {...})."""
    async def go():
        async with Client(url, user_agent="pytest") as client:
            return await getattr(client, method)(*args, **kwargs)
    return run(go())


def raw(url: str, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
    """(status, decoded JSON or text, headers) of one HTTP request with a raw body."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, text, headers = resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        status, text, headers = err.code, err.read().decode(), dict(err.headers)
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, text, headers


def crd(plural: str) -> dict:
    return yaml.safe_load((CRDS / f"branchmerge.dev_{plural}.yaml").read_text())


def example(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / "examples" / path).read_text()) if d]


def configmap(name: str, **meta) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": {"k": "v"}}


async def eventually(fn, what: str = "condition", timeout: float = 30.0):
    """Call ``fn()`` (a plain function or a coroutine function) until it gives something truthy (that value),
    or fail naming ``what``: the asyncio sibling of testcluster.wait.wait_for."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")
