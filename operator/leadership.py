"""Whether this replica may act: the same verdict kopf's peering reaches, for the operator's own workers.

kopf pauses only its watch streams when a peer with a higher (or the same) priority is alive; the
operator's reconcile workers, its ``add_after`` timers and the progress endpoint are its own, and without
this they would go on acting on a frozen store and write stale status next to the active replica. So the
operator reads the same peering objects kopf writes (``KopfPeering`` per served namespace, or the
``ClusterKopfPeering``), with the same identity it gives kopf, and applies kopf's rule: paused while any live
peer other than itself has a priority >= its own (kopf pauses every replica of equal priority); a peer is
live until ``lastseen + lifetime``. Standalone (no peering): always leading.

Checked every ``interval`` seconds; a read that fails keeps the last verdict (kopf, whose own view comes
from a watch, does the same), except that a replica that has never read the object does not lead.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Collection

from ..api.timefmt import parse_time

log = logging.getLogger("branchmerge.operator.leadership")


def paused_by(peering: dict | None, identity: str, priority: int, now: datetime) -> list[str]:
    """The live peers that make ``identity`` pause (empty: it may act)."""
    blockers = []
    for peer, info in ((peering or {}).get("status") or {}).items():
        if peer == identity or not isinstance(info, dict):
            continue
        seen = parse_time(info.get("lastseen"))
        lifetime = float(info.get("lifetime", 60))
        if seen is None or now.timestamp() - seen >= lifetime:
            continue  # dead: kopf ignores it (and cleans it up)
        if int(info.get("priority", 0)) >= priority:
            blockers.append(peer)
    return sorted(blockers)


class Leadership:
    def __init__(self, client, name: str | None, identity: str, priority: int, *, clusterwide: bool,
                 namespaces: Collection[str] = (), interval: float = 2.0):
        self.client = client
        self.name = name
        self.identity = identity
        self.priority = priority
        self.clusterwide = clusterwide
        self.namespaces = list(namespaces)
        self.interval = interval
        self.leading = asyncio.Event()
        if name is None:
            self.leading.set()
        self._task: asyncio.Task | None = None

    def _paths(self) -> list[str]:
        if self.clusterwide:
            return [f"/apis/kopf.dev/v1/clusterkopfpeerings/{self.name}"]
        return [f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/{self.name}" for ns in self.namespaces]

    async def check(self) -> bool:
        """Read the peering objects once and update ``leading``; returns the verdict."""
        now = datetime.now(timezone.utc)
        blockers: list[str] = []
        for path in self._paths():
            peering = await self.client.request("GET", path, ok404=True)
            blockers += paused_by(peering, self.identity, self.priority, now)
        if blockers and self.leading.is_set():
            log.info("another operator replica is active (%s): reconciles paused", ", ".join(blockers))
            self.leading.clear()
        elif not blockers and not self.leading.is_set():
            log.info("no other active operator replica: reconciles resumed")
            self.leading.set()
        return not blockers

    async def _loop(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 -- keep the last verdict; the next check may succeed
                log.warning("peering not read: %s", err)
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        if self.name is not None and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="leadership")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
