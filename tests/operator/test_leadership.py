"""operator/leadership.py's verdict, against peering objects as kopf writes them (tests/cluster/
test_leadership.py runs two replicas on the stand-in cluster)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from branchmerge.operator.leadership import paused_by

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)


def _peer(priority: int, seen_ago: float, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime,
            "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat()}


def test_kopfs_rule_higher_or_equal_live_priority_pauses():
    me = "pod-a/1"
    peering = {"status": {me: _peer(100, 1), "pod-b/2": _peer(200, 5)}}
    assert paused_by(peering, me, 100, NOW) == ["pod-b/2"]
    assert paused_by(peering, "pod-b/2", 200, NOW) == []  # the higher one acts
    same = {"status": {me: _peer(100, 1), "pod-c/3": _peer(100, 1)}}
    assert paused_by(same, me, 100, NOW) == ["pod-c/3"]  # kopf pauses every replica of equal priority


def test_dead_or_malformed_peers_do_not_pause():
    me = "pod-a/1"
    peering = {"status": {me: _peer(1, 0), "gone/2": _peer(200, 61), "short/3": _peer(200, 11, lifetime=10),
                          "odd/4": "not a peer", "unseen/5": {"priority": 300}}}
    assert paused_by(peering, me, 1, NOW) == []
    assert paused_by(None, me, 1, NOW) == [] and paused_by({}, me, 1, NOW) == []
