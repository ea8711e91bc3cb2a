"""One run of a container probe, as the kubelet's prober does it: ``exec`` (a command, success = exit 0),
``httpGet`` (success = status 200..399), ``tcpSocket`` (success = the connection opens), each within
``timeoutSeconds`` (default 1). ``httpGet``/``tcpSocket`` go from the node (the host) to the pod's IP
unless the probe names a ``host``, as the kubelet's prober does; ``exec`` runs in the pod's network
namespace (the sandbox spec carries it).

Not emulated: ``exec`` probes run as a fresh process with the container's mounts, user and env, not
inside the running container's own root overlay (files it wrote outside its volumes are not seen);
``grpc`` probes (they fail); HTTPS certificate handling (not verified, as the kubelet does not either);
the probe's own ``terminationGracePeriodSeconds``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from dataclasses import replace
from typing import Awaitable, Callable

from .sandbox import Spec, StartError, start

log = logging.getLogger("testcluster.probes")
HOST = "127.0.0.1"


def _port(value, container: dict) -> int:
    """A number, or the name of one of the container's ports."""
    if isinstance(value, str) and not value.isdigit():
        for port in container.get("ports") or []:
            if port.get("name") == value:
                return int(port["containerPort"])
        raise ValueError(f"port {value!r} is not a named port of the container")
    return int(value)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def check(probe: dict, container: dict, sandbox: Spec, log_path: str,
                blocking: Callable[..., Awaitable], host: str = HOST) -> bool:
    """True when the probe succeeds. ``blocking(fn, *args)`` runs a blocking call off the event loop;
    ``host``: the pod's IP (the default target of httpGet and tcpSocket)."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "exec" in probe:
            run = replace(sandbox, argv=list(probe["exec"].get("command") or []),
                          scratch=sandbox.scratch + f".probe-{os.urandom(3).hex()}")
            try:
                proc = await blocking(start, run, log_path)
            except StartError:
                return False
            try:
                async with asyncio.timeout(timeout):
                    return await blocking(proc.wait) == 0
            except TimeoutError:
                _killpg(proc.pid)
                await blocking(proc.wait)
                return False
            finally:
                shutil.rmtree(run.scratch, ignore_errors=True)
        if "httpGet" in probe:
            import aiohttp
            get = probe["httpGet"]
            scheme = (get.get("scheme") or "HTTP").lower()
            url = f"{scheme}://{get.get('host') or host}:{_port(get.get('port'), container)}{get.get('path') or '/'}"
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            async with aiohttp.ClientSession() as session:
                async with session.get(url, headers=headers, ssl=False,
                                       timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    return 200 <= resp.status < 400
        if "tcpSocket" in probe:
            sock = probe["tcpSocket"]
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(sock.get("host") or host, _port(sock.get("port"), container))
            writer.close()
            return True
    except (OSError, asyncio.TimeoutError, ValueError, TypeError):
        return False
    except Exception as err:  # aiohttp's client errors
        log.debug("probe failed: %r", err)
        return False
    return False  # grpc
