"""Reads of the API-server stand-in: list with selectors and pages, watch (history replay, synthetic ADDED,
bookmarks, timeouts, selector enter/leave), 410 Gone after a compaction (the Informer and kopf itself relist),
fault injection."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from testcluster import ApiError, ApiServer, Client, Gone, Informer
from testcluster.wait import wait_for

from .apiserver_helpers import MERGES, call, configmap, example, raw


@pytest.fixture(scope="module")
def server():
    with ApiServer(gc="off", bookmark_interval=0.3) as srv:
        yield srv


def _labelled(server, ns="default"):
    for name, labels in (("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"}), ("c", {"other": "z"})):
        call(server.url, "create", "v1", "configmaps", ns, configmap(name, labels=labels))


@pytest.fixture(scope="module")
def selector_ns(server):
    call(server.url, "create", "v1", "namespaces", None, {"metadata": {"name": "sel"}})
    _labelled(server, "sel")
    return "sel"


@pytest.mark.parametrize("selector,names", [
    ("app=x", ["a"]), ("app==x", ["a"]), ("app!=x", ["b", "c"]), ("app in (x,y)", ["a", "b"]),
    ("app notin (x)", ["b", "c"]), ("app", ["a", "b"]), ("!app", ["c"]), ("app,tier=1", ["a"]), ("", ["a", "b", "c"]),
])
def test_label_selectors_on_list(server, selector_ns, selector, names):
    items, _ = call(server.url, "list", "v1", "configmaps", selector_ns, label_selector=selector)
    assert [o["metadata"]["name"] for o in items] == names


def test_bad_selectors_are_400(server, selector_ns):
    for params in ("labelSelector=app%20%3E%201", "labelSelector=bad%20key!%3Dv", "fieldSelector=data.k%3Dv",
                   "fieldSelector=spec.nodeName%3Dn"):
        status, body, _ = raw(server.url, "GET", f"/api/v1/namespaces/{selector_ns}/configmaps?{params}")
        assert status == 400 and body["reason"] == "BadRequest", params
    status, body, _ = raw(server.url, "GET", "/api/v1/namespaces/sel/pods?fieldSelector=spec.nodeName%3Dn")
    assert status == 200 and body["items"] == []


def test_field_selectors(server):
    for name, node in (("p1", "node-1"), ("p2", None)):
        pod = {"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i:1"}]}}
        if node:
            pod["spec"]["nodeName"] = node
        call(server.url, "create", "v1", "pods", "default", pod)
    names = lambda sel: [o["metadata"]["name"] for o in call(server.url, "list", "v1", "pods", "default",
                                                             field_selector=sel)[0]]
    assert names("spec.nodeName=node-1") == ["p1"]
    assert names("spec.nodeName=") == ["p2"]
    assert names("spec.nodeName!=node-1,status.phase=Pending") == ["p2"]
    assert names("metadata.name=p2") == ["p2"]


def test_list_shape_and_pages(server, selector_ns):
    status, doc, _ = raw(server.url, "GET", f"/api/v1/namespaces/{selector_ns}/configmaps?limit=2")
    assert doc["kind"] == "ConfigMapList" and doc["apiVersion"] == "v1"
    assert "kind" not in doc["items"][0]  # typed lists of built-ins: no kind on items (clients fill it in)
    assert doc["metadata"]["remainingItemCount"] == 1 and doc["metadata"]["continue"]
    rv = doc["metadata"]["resourceVersion"]
    call(server.url, "create", "v1", "configmaps", selector_ns, configmap("zz-after-first-page"))
    status, page2, _ = raw(server.url, "GET", f"/api/v1/namespaces/{selector_ns}/configmaps?limit=2&continue="
                           + doc["metadata"]["continue"])
    assert [o["metadata"]["name"] for o in page2["items"]] == ["c"]  # a consistent snapshot
    assert page2["metadata"]["resourceVersion"] == rv and not page2["metadata"].get("continue")
    call(server.url, "create", MERGES, "merges", "default", example("02-merge-methods/ties.yaml")[0])
    _, merges, _ = raw(server.url, "GET", f"/apis/{MERGES}/namespaces/default/merges")
    assert merges["kind"] == "MergeList" and merges["items"][0]["kind"] == "Merge"
    items, _ = call(server.url, "list", "v1", "configmaps", selector_ns, limit=1)  # the client follows pages
    assert len(items) == 4
    call(server.url, "delete", "v1", "configmaps", selector_ns, "zz-after-first-page")


async def _collect(client: Client, *args, until, **kwargs) -> list[tuple[str, dict]]:
    events = []
    async for event in client.watch(*args, **kwargs):
        events.append(event)
        if until(events):
            break
    return events


def test_watch_replays_history_and_follows_changes(server):
    async def scenario():
        async with Client(server.url) as c:
            first = await c.create("v1", "configmaps", "default", configmap("w1"))
            await c.patch("v1", "configmaps", "default", "w1", {"data": {"k": "2"}})
            await c.delete("v1", "configmaps", "default", "w1")
            events = await _collect(c, "v1", "configmaps", "default", resource_version=str(
                int(first["metadata"]["resourceVersion"]) - 1), field_selector="metadata.name=w1",
                until=lambda e: len([x for x in e if x[0] != "BOOKMARK"]) == 3)
            types = [t for t, _ in events if t != "BOOKMARK"]
            assert types == ["ADDED", "MODIFIED", "DELETED"]
            rvs = [int(o["metadata"]["resourceVersion"]) for t, o in events if t != "BOOKMARK"]
            assert rvs == sorted(rvs) and len(set(rvs)) == 3
            # "" and "0": the current state as synthetic ADDED, then changes.
            await c.create("v1", "configmaps", "default", configmap("w2"))
            for rv in ("", "0"):
                got = await _collect(c, "v1", "configmaps", "default", resource_version=rv,
                                     field_selector="metadata.name=w2", until=lambda e: e[-1][0] == "ADDED")
                assert got[-1][1]["metadata"]["name"] == "w2" and got[-1][1]["kind"] == "ConfigMap"
    asyncio.run(scenario())


def test_watch_with_a_selector_sends_added_and_deleted_when_objects_enter_and_leave(server):
    async def scenario():
        async with Client(server.url) as c:
            await c.create("v1", "configmaps", "default", configmap("sel1", labels={"team": "a"}))
            _, rv = await c.list("v1", "configmaps", "default")
            events: list = []

            async def watch():
                async for event in c.watch("v1", "configmaps", "default", resource_version=rv,
                                           label_selector="team=b"):
                    if event[0] != "BOOKMARK":
                        events.append(event)
                    if len(events) == 3:
                        return
            task = asyncio.create_task(watch())
            await asyncio.sleep(0.1)
            await c.patch("v1", "configmaps", "default", "sel1", {"metadata": {"labels": {"team": "b"}}})
            await c.patch("v1", "configmaps", "default", "sel1", {"data": {"k": "changed"}})
            await c.patch("v1", "configmaps", "default", "sel1", {"metadata": {"labels": {"team": "c"}}})
            await asyncio.wait_for(task, 10)
            assert [t for t, _ in events] == ["ADDED", "MODIFIED", "DELETED"]
            gone = events[-1][1]
            assert gone["metadata"]["labels"] == {"team": "b"}  # the last state that matched...
            assert int(gone["metadata"]["resourceVersion"]) > int(events[1][1]["metadata"]["resourceVersion"])
    asyncio.run(scenario())


def test_bookmarks_and_timeout(server):
    async def scenario():
        async with Client(server.url) as c:
            _, rv = await c.list("v1", "configmaps", "default")
            start = time.monotonic()
            events = [e async for e in c.watch("v1", "configmaps", "default", resource_version=rv,
                                               timeout_seconds=1)]
            elapsed = time.monotonic() - start
            assert 0.9 < elapsed < 5
            assert len(events) >= 3 and all(t == "BOOKMARK" for t, _ in events)
            assert set(events[0][1]) == {"kind", "apiVersion", "metadata"}
            assert set(events[0][1]["metadata"]) == {"resourceVersion"}
            no_bookmarks = [e async for e in c.watch("v1", "configmaps", "default", resource_version=rv,
                                                     timeout_seconds=1, bookmarks=False)]
            assert no_bookmarks == []
    asyncio.run(scenario())


def test_send_initial_events_ends_with_an_annotated_bookmark(server):
    status, text, headers = raw(server.url, "GET", "/api/v1/namespaces/sel/configmaps?watch=true&sendInitialEvents="
                                "true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1")
    import json
    lines = [json.loads(line) for line in text.splitlines()]
    assert headers["Content-Type"].startswith("application/json")
    added = [e for e in lines if e["type"] == "ADDED"]
    assert len(added) == 3
    first_bookmark = next(e for e in lines if e["type"] == "BOOKMARK")
    assert lines.index(first_bookmark) == 3
    assert first_bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_compaction_gives_410_to_old_resource_versions_and_closes_open_watches():
    with ApiServer(gc="off", bookmark_interval=60) as srv:
        async def scenario():
            async with Client(srv.url) as c:
                created = await c.create("v1", "configmaps", "default", configmap("old"))
                _, rv = await c.list("v1", "configmaps", "default")
                seen: list = []

                async def watch():
                    async for event in c.watch("v1", "configmaps", "default", resource_version=rv):
                        seen.append(event)
                task = asyncio.create_task(watch())
                await asyncio.sleep(0.2)
                await c.patch("v1", "configmaps", "default", "old", {"data": {"k": "1"}})
                await asyncio.sleep(0.1)
                srv.compact()
                with pytest.raises(Gone):
                    await asyncio.wait_for(task, 5)
                assert [t for t, _ in seen] == ["MODIFIED"]
                with pytest.raises(Gone):
                    async for _ in c.watch("v1", "configmaps", "default",
                                           resource_version=created["metadata"]["resourceVersion"]):
                        pass
        asyncio.run(scenario())


def test_a_watch_older_than_the_history_window_is_410():
    with ApiServer(gc="off", history=3) as srv:
        first = call(srv.url, "create", "v1", "configmaps", "default", configmap("h"))
        for i in range(5):
            call(srv.url, "patch", "v1", "configmaps", "default", "h", {"data": {"k": str(i)}})
        recent = srv.objects("v1", "configmaps", "default")[0]["metadata"]["resourceVersion"]

        async def scenario():
            async with Client(srv.url) as c:
                with pytest.raises(Gone):
                    async for _ in c.watch("v1", "configmaps", "default",
                                           resource_version=first["metadata"]["resourceVersion"]):
                        pass
                events = await _collect(c, "v1", "configmaps", "default", resource_version=str(int(recent) - 1),
                                        until=lambda e: True)
                assert events[0][0] == "MODIFIED" and events[0][1]["data"] == {"k": "4"}
        asyncio.run(scenario())


def test_informer_relists_after_410_and_synthesises_deletions():
    with ApiServer(gc="off", bookmark_interval=0.2) as srv:
        async def scenario():
            async with Client(srv.url) as c, Client(srv.url) as writer:
                for name in ("i1", "i2"):
                    await writer.create("v1", "configmaps", "default", configmap(name))
                events: list = []

                async def on_event(type_, obj):
                    events.append((type_, obj["metadata"]["name"]))
                informer = Informer(c, "v1", "configmaps", "default", on_event=on_event)
                task = asyncio.create_task(informer.run())
                await asyncio.wait_for(informer.synced(), 5)
                assert sorted(events) == [("ADDED", "i1"), ("ADDED", "i2")]
                # Changes the informer cannot see as events: the watch is cut, history compacted meanwhile.
                srv.faults.add_delay(1.0, method="GET", path_regex="watch=true", count=1)
                srv.faults.drop_watches()
                await asyncio.sleep(0.2)
                await writer.delete("v1", "configmaps", "default", "i1")
                await writer.patch("v1", "configmaps", "default", "i2", {"data": {"k": "new"}})
                await writer.create("v1", "configmaps", "default", configmap("i3"))
                srv.compact()
                for _ in range(100):
                    if ("DELETED", "i1") in events and ("ADDED", "i3") in events:
                        break
                    await asyncio.sleep(0.05)
                assert ("DELETED", "i1") in events and ("MODIFIED", "i2") in events and ("ADDED", "i3") in events
                assert set(informer.cache) == {("default", "i2"), ("default", "i3")}
                assert informer.relists >= 2
                assert informer.cache[("default", "i2")]["kind"] == "ConfigMap"
                task.cancel()
        asyncio.run(scenario())
        assert srv.faults.injected["delay"] == 1


def test_injected_faults(server):
    server.faults.add(503, method="GET", path_regex=r"/configmaps/fault-me$", count=2)
    call(server.url, "create", "v1", "configmaps", "default", configmap("fault-me"))
    for _ in range(2):
        status, body, headers = raw(server.url, "GET", "/api/v1/namespaces/default/configmaps/fault-me")
        assert status == 503 and body["reason"] == "ServiceUnavailable" and headers.get("Retry-After")
    assert call(server.url, "get", "v1", "configmaps", "default", "fault-me")["metadata"]["name"] == "fault-me"
    server.faults.add(409, method="PATCH")
    with pytest.raises(ApiError) as err:
        call(server.url, "patch", "v1", "configmaps", "default", "fault-me", {"data": {"x": "y"}})
    assert err.value.status == 409
    server.faults.add_delay(0.5, path_regex="fault-me")
    start = time.monotonic()
    call(server.url, "get", "v1", "configmaps", "default", "fault-me")
    assert time.monotonic() - start >= 0.5
    assert server.faults.injected["503"] >= 2 and server.faults.injected["409"] >= 1


def test_kopf_relists_after_a_compaction():
    import kopf

    with ApiServer(gc="off", bookmark_interval=1) as srv:
        for i in range(3):
            doc = example("02-merge-methods/ties.yaml")[0]
            doc["metadata"]["name"] = f"k{i}"
            call(srv.url, "create", MERGES, "merges", "default", doc)
        registry = kopf.OperatorRegistry()
        listed: list[str] = []
        watched: list[tuple[str, str]] = []

        @kopf.on.login(registry=registry)
        def login(**_):
            return kopf.ConnectionInfo(server=srv.url, default_namespace="default")

        @kopf.on.event("branchmerge.dev", "v1alpha1", "merges", registry=registry)
        def on_event(event, name, **_):
            if event["type"] is None:
                listed.append(name)
            else:
                watched.append((event["type"], name))

        settings = kopf.OperatorSettings()
        settings.posting.enabled = False
        stop, ready = threading.Event(), threading.Event()

        def run():
            asyncio.run(kopf.operator(registry=registry, settings=settings, standalone=True,
                                      namespaces=["default"], stop_flag=stop, ready_flag=ready))
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            assert ready.wait(20)
            wait_for(lambda: sorted(listed) == ["k0", "k1", "k2"], timeout=20)
            srv.compact()
            wait_for(lambda: len(listed) == 6, timeout=20)  # kopf's watcher saw 410 and listed again
            assert sorted(listed[3:]) == ["k0", "k1", "k2"]
            call(srv.url, "patch", MERGES, "merges", "default", "k1", {"metadata": {"labels": {"after": "yes"}}})
            wait_for(lambda: ("MODIFIED", "k1") in watched, timeout=20)
        finally:
            stop.set()
            thread.join(20)
        assert ("kopf", "watch", "branchmerge.dev", "merges") in srv.audit
