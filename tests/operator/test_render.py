"""``branchmerge render``: the objects it prints are the ones the operator creates (checked against the real
operator on the API-server stand-in), they are valid Kubernetes objects, and bad manifests fail as validate."""
from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from branchmerge.api.crdgen import crd
from branchmerge.api.manifests import manifest_files
from branchmerge.cli import build_parser, main
from branchmerge.commands.operator import options_from_args
from branchmerge.operator.emulator import Api, OperatorThread
from branchmerge.operator.render import apply_defaults, schema_errors
from testcluster.apiserver import ApiServer
from testcluster.schema import Schema

REPO = Path(__file__).resolve().parents[2]
TINYR1 = str(REPO / "examples/tinyr1")
QUICKSTART = str(REPO / "examples/quickstart")
# The quickstart names no output URIs (the local runner picks them): on a cluster the operator needs a root.
QUICKSTART_FLAGS = ["--default-output-root", "pvc://work/quickstart", "--image", "registry.example/trainer:test",
                    "--progress-url", "http://op.example.svc:8082/progress", "--default-cpu-request", "1"]
NS = "render-ns"

pytestmark = pytest.mark.timeout(180)


def render(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["render", *args])
    out, err = capsys.readouterr()
    return code, out, err


def rendered(capsys, *args: str) -> list[dict]:
    code, out, err = render(capsys, *args)
    assert code == 0, err
    return [doc for doc in yaml.safe_load_all(out) if doc]


def manifests(folder: str) -> list[dict]:
    """The CRs under ``folder`` (as ``load``, other YAML in it is not ours)."""
    return [doc for path in manifest_files([folder]) for doc in yaml.safe_load_all(path.read_text())
            if doc and str(doc.get("apiVersion", "")).startswith("branchmerge.dev/")]


def upstreams_of(doc: dict) -> set[str]:
    """Kind/name of every ``from:`` in a manifest."""
    found, stack = set(), [doc["spec"]]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("from"), dict):
                found.add(f"{node['from']['kind']}/{node['from']['name']}")
            stack += node.values()
        elif isinstance(node, list):
            stack += node
    return found


def uris(node) -> list[str]:
    if isinstance(node, dict):
        return [node["uri"]] if isinstance(node.get("uri"), str) else [u for v in node.values() for u in uris(v)]
    return [u for v in node for u in uris(v)] if isinstance(node, list) else []


def key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def owner(obj: dict) -> str:
    labels = obj["metadata"]["labels"]
    return f"{labels['branchmerge.dev/kind']}/{labels['branchmerge.dev/name']}"


# ---- the operator's own objects ----------------------------------------------------------------------

def run_on_stand_in(docs: list[dict], opts) -> tuple[dict, dict]:
    """Apply ``docs`` to the API-server stand-in (CRD defaults and validation) with the kopf operator serving
    the namespace, completing every Job it creates until each CR has succeeded (so every downstream gets its
    Job). Returns the children by (kind, name) and each CR's uid by Kind/name."""
    with ApiServer(REPO / "crds", gc="off") as server:
        api = Api(server.url)
        api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        with OperatorThread(server.url, opts, namespaces=[NS], metrics_port=None):
            for doc in docs:
                api.create(doc, NS)
            completed: set[str] = set()
            deadline = time.monotonic() + 120
            while not all(phase == "Succeeded" for phase in phases(api, docs).values()):
                assert time.monotonic() < deadline, f"not all CRs succeeded: {phases(api, docs)}"
                for job in api.list("Job", NS):
                    if job["metadata"]["name"] not in completed:
                        complete(api, job)
                        completed.add(job["metadata"]["name"])
                time.sleep(0.1)
        children = {(kind, obj["metadata"]["name"]): dict(obj, kind=kind, apiVersion=version)
                    for kind, version in (("ConfigMap", "v1"), ("Service", "v1"), ("Job", "batch/v1"))
                    for obj in api.list(kind, NS)}
        uids = {f"{d['kind']}/{d['metadata']['name']}": api.get(d["kind"], NS, d["metadata"]["name"])["metadata"]["uid"]
                for d in docs}
    return children, uids


def phases(api: Api, docs: list[dict]) -> dict[str, str | None]:
    return {d["metadata"]["name"]: ((api.get(d["kind"], NS, d["metadata"]["name"]) or {}).get("status") or {})
            .get("phase") for d in docs}


def complete(api: Api, job: dict) -> None:
    """The Job controller's word that every pod succeeded (no pods: the result carries no metrics)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"startTime": now, "completionTime": now, "succeeded": job["spec"]["completions"],
              "conditions": [{"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                             {"type": "Complete", "status": "True", "lastTransitionTime": now}]}
    api.patch("Job", NS, job["metadata"]["name"], {"status": status}, sub="status")


def missing_from(mine, theirs, path: str = "") -> list[str]:
    """Where ``theirs`` (a stored object: server defaults added) does not hold what ``mine`` says."""
    if isinstance(mine, dict):
        if not isinstance(theirs, dict):
            return [path]
        return [p for k, v in mine.items() for p in missing_from(v, theirs.get(k), f"{path}.{k}")]
    if isinstance(mine, list):
        if not isinstance(theirs, list) or len(mine) != len(theirs):
            return [path]
        return [p for i, (a, b) in enumerate(zip(mine, theirs)) for p in missing_from(a, b, f"{path}[{i}]")]
    return [] if mine == theirs else [f"{path}: {mine!r} != {theirs!r}"]


@pytest.mark.parametrize("folder,flags", [(TINYR1, []), (QUICKSTART, QUICKSTART_FLAGS)], ids=["tinyr1", "quickstart"])
def test_render_prints_what_the_operator_creates(capsys, folder, flags):
    args = ["-f", folder, "-n", NS, *flags]
    # A MergeSearch's children follow from its trials' scores (Jobs completed here report none): render shows
    # neither them nor the search's downstreams' real inputs, so those are left out on both sides (the search
    # through the operator: tests/operator/test_mergesearch_operator.py, tests/cluster/test_quickstart_on_cluster.py)
    docs = manifests(folder)
    searched = {f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["kind"] == "MergeSearch"}
    searched |= {f"{d['kind']}/{d['metadata']['name']}" for d in docs if upstreams_of(d) & searched}
    objects = [o for o in rendered(capsys, *args) if owner(o) not in searched]
    opts = options_from_args(build_parser().parse_args(["render", *args]))  # as `branchmerge operator` would
    children, uids = run_on_stand_in([d for d in docs if f"{d['kind']}/{d['metadata']['name']}" not in searched],
                                     opts)
    assert {key(o) for o in objects} == set(children)  # the same names: same run hashes, nothing more or less
    for obj in objects:
        obj = copy.deepcopy(obj)
        for ref in obj["metadata"]["ownerReferences"]:
            assert ref["uid"] == f"<uid of {ref['kind']}/{ref['name']}>"  # the placeholder the output explains
            ref["uid"] = uids[f"{ref['kind']}/{ref['name']}"]
        assert missing_from(obj, children[key(obj)]) == [], key(obj)


# ---- the output ---------------------------------------------------------------------------------------

def test_yaml_and_json_hold_the_same_objects_in_pipeline_order(capsys):
    objects = rendered(capsys, "-f", TINYR1)
    code, out, err = render(capsys, "-f", TINYR1, "-o", "json")
    listed = json.loads(out)
    assert code == 0 and listed["apiVersion"] == "v1" and listed["kind"] == "List"
    assert listed["items"] == objects
    crs = manifests(TINYR1)
    order = list(dict.fromkeys(owner(o) for o in objects))
    assert sorted(order) == sorted(f"{d['kind']}/{d['metadata']['name']}" for d in crs)
    for doc in crs:  # every upstream's objects come before its downstream's
        me = f"{doc['kind']}/{doc['metadata']['name']}"
        assert all(order.index(up) < order.index(me) for up in upstreams_of(doc))
    for cr in order:  # ConfigMap, a Service only for multi-pod runs, then attempt 1's Job
        mine = [o for o in objects if owner(o) == cr]
        job = mine[-1]
        pods = job["spec"]["completions"]
        assert [o["kind"] for o in mine] == ["ConfigMap"] + ["Service"] * (pods > 1) + ["Job"]
        assert job["metadata"]["name"].endswith("-1") and job["metadata"]["labels"]["branchmerge.dev/attempt"] == "1"
        assert all(o["metadata"]["namespace"] == "default" for o in mine)
    text = render(capsys, "-f", TINYR1)[1]
    assert "A retry creates the same Job" in text
    assert not re.search(r"[&*]id\d+", text), "YAML anchors/aliases (kubectl reads them, people do not)"


def test_namespace_is_applied_and_a_conflicting_one_refused(capsys, tmp_path):
    objects = rendered(capsys, "-f", TINYR1, "--namespace", "team-a")
    assert {o["metadata"]["namespace"] for o in objects} == {"team-a"}
    spec = json.loads(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["spec.yaml"])
    assert spec["metadata"]["namespace"] == "team-a"  # the stage sees its namespace too
    doc = manifests(TINYR1)[0]
    doc["metadata"]["namespace"] = "team-b"
    (tmp_path / "cr.yaml").write_text(yaml.safe_dump(doc))
    code, out, err = render(capsys, "-f", str(tmp_path), "-n", "team-a")
    assert code == 2 and out == "" and "does not match the namespace given (team-a)" in err


def test_jobs_carry_the_gpus_and_placement_of_their_manifests(capsys):
    objects = {key(o): o for o in rendered(capsys, "-f", TINYR1)}
    with_gpus = 0
    for doc in manifests(TINYR1):
        resources = doc["spec"].get("resources") or {}
        job = next(o for (kind, _), o in objects.items()
                   if kind == "Job" and owner(o) == f"{doc['kind']}/{doc['metadata']['name']}")
        pod = job["spec"]["template"]["spec"]
        stage = next(c for c in pod["containers"] if c["name"] == "stage")
        gpus = int(resources.get("gpusPerNode", 0))
        if gpus:
            with_gpus += 1
            assert stage["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
            assert stage["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        else:
            assert "nvidia.com/gpu" not in json.dumps(stage.get("resources", {}))
        assert resources.get("nodeSelector", {}).items() <= pod.get("nodeSelector", {}).items()
        assert all(t in pod.get("tolerations", []) for t in resources.get("tolerations", []))
        assert job["spec"]["completions"] == int(resources.get("nodes", 1)) or doc["kind"] in ("Merge", "Eval")
    assert with_gpus, "tinyr1 has GPU stages"


def test_upstream_inputs_are_the_operator_uris_or_placeholders(capsys):
    code, out, _ = render(capsys, "-f", TINYR1)
    objects = [d for d in yaml.safe_load_all(out) if d]
    shown = rendered(capsys, "-f", TINYR1, "--placeholders")
    docs = {f"{d['kind']}/{d['metadata']['name']}": d for d in manifests(TINYR1)}
    downstreams = [cr for cr, doc in docs.items() if upstreams_of(doc)]
    assert downstreams
    for cr in downstreams:
        ups = upstreams_of(docs[cr])
        assert all(f"the output of {up}, which must succeed first" in out for up in ups)
        spec = next(json.loads(o["data"]["spec.yaml"]) for o in objects if o["kind"] == "ConfigMap" and owner(o) == cr)
        assert "from" not in json.dumps(spec["spec"])
        inputs = {u for u in uris(spec["spec"]) if u != spec["spec"]["output"]["uri"]}
        assert {docs[up]["spec"]["output"]["uri"] for up in ups} <= inputs  # what the operator will resolve
        # ...so the pod mounts each upstream's claim, as the operator's will
        job = next(o for o in objects if o["kind"] == "Job" and owner(o) == cr)
        claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert {docs[up]["spec"]["output"]["uri"].split("/")[2] for up in ups} <= claims

        spec = next(json.loads(o["data"]["spec.yaml"]) for o in shown if o["kind"] == "ConfigMap" and owner(o) == cr)
        assert {u for u in uris(spec["spec"]) if u.startswith("<")} == {f"<output of {up}>" for up in ups}
    first = [o for o in shown if not upstreams_of(docs[owner(o)])]
    assert first == [o for o in objects if not upstreams_of(docs[owner(o)])]  # no inputs: nothing changes


# ---- failures -----------------------------------------------------------------------------------------

def test_invalid_manifest_fails_with_validates_messages(capsys, tmp_path):
    doc = yaml.safe_load((REPO / "examples/tinyr1/02-merge.yaml").read_text().split("---")[0])
    doc["spec"]["models"][1]["weight"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, err = render(capsys, "-f", str(path))
    assert code == 2 and out == ""
    assert main(["validate", "-f", str(path)]) == 1
    assert capsys.readouterr().err == err
    assert f"error: {path}: spec.models[1].weight: must be > 0" in err.splitlines()
    code, out, err = render(capsys, "-f", str(tmp_path / "empty"))
    assert code == 2 and "error:" in err


def test_what_the_operator_refuses_fails_with_its_reason(capsys):
    code, out, err = render(capsys, "-f", QUICKSTART)  # no output URIs and no --default-output-root
    assert code == 2 and out == ""
    assert "error: BranchSFT/qs-teacher: InvalidSpec: spec.output.uri: required" in err
    assert err.strip().splitlines()[-1].endswith("error(s)")


def test_an_object_kubernetes_would_reject_fails_with_exit_1(capsys, tmp_path):
    doc = yaml.safe_load((REPO / "examples/cluster/teachergen-openai.yaml").read_text())
    doc["metadata"]["labels"] = {"team": "x" * 64}  # copied onto every child, where the API server refuses it
    (tmp_path / "cr.yaml").write_text(yaml.safe_dump(doc))
    code, out, err = render(capsys, "-f", str(tmp_path))
    assert code == 1 and out == ""
    assert "is not a valid label value (at most 63 characters)" in err and err.strip().endswith("3 error(s)")


# ---- the Kubernetes checks ----------------------------------------------------------------------------

def test_rendered_objects_pass_the_kubernetes_json_schemas(capsys):
    checks = [(obj, version) for obj in rendered(capsys, "-f", TINYR1) for version in ("1.30.0", "1.37.0")]
    checks += [(obj, "1.30.0") for obj in rendered(capsys, "-f", QUICKSTART, *QUICKSTART_FLAGS)]  # other flags
    for obj, version in checks:  # the oldest and newest Kubernetes the deploy manifests are checked against
        kubernetes_validate.validate(obj, version, strict=True)


def test_schema_check_finds_what_the_api_server_rejects(capsys):
    objects = rendered(capsys, "-f", TINYR1)
    job = next(o for o in objects if o["kind"] == "Job" and o["spec"]["completions"] > 1 and "nvidia.com/gpu" in
               json.dumps(o["spec"]["template"]["spec"]["containers"][0].get("resources")))
    service = next(o for o in objects if o["kind"] == "Service")
    assert schema_errors(job) == [] and schema_errors(service) == []
    container = ("spec", "template", "spec", "containers", 0)

    def broken(obj: dict, path: tuple, change) -> list[str]:
        obj = copy.deepcopy(obj)
        node = obj
        for part in path:
            node = node[part]
        change(node)
        return schema_errors(obj)

    where = "spec.template.spec.containers[0]"
    assert broken(job, container, lambda c: c.update(imagePullPolcy="Always")) == \
        [f"{where}.imagePullPolcy: unknown field"]
    assert broken(job, container, lambda c: c.update(image_pull_policy=c.pop("imagePullPolicy"))) == \
        [f"{where}.image_pull_policy: not read back as written (not the API's spelling of the field?)"]
    assert broken(job, ("spec",), lambda s: s.update(backoffLimit="0")) == ["spec.backoffLimit: Input should be a "
                                                                            "valid integer"]
    assert broken(job, container, lambda c: c.pop("name")) == [f"{where}.name: required"]
    assert broken(job, container, lambda c: c["volumeMounts"].append({"name": "nope", "mountPath": "/x"})) == \
        [f"{where}.volumeMounts[{len(job['spec']['template']['spec']['containers'][0]['volumeMounts'])}].name: "
         "no volume named 'nope'"]
    gpus = int(job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"])
    assert broken(job, container, lambda c: c["resources"]["limits"].update({"nvidia.com/gpu": str(gpus + 1)})) == \
        [f"{where}.resources.limits[nvidia.com/gpu]: an extended resource needs a whole-number limit equal to its "
         "request"]
    assert broken(job, container, lambda c: c["resources"]["limits"].update({"nvidia.com/gpu": str(gpus - 1)})) == \
        [f"{where}.resources.requests[nvidia.com/gpu]: must be less than or equal to the limit",
         f"{where}.resources.limits[nvidia.com/gpu]: an extended resource needs a whole-number limit equal to its "
         "request"]
    assert broken(job, ("metadata", "labels"), lambda labels: labels.update(team="x" * 64)) == \
        [f"metadata.labels[team]: {'x' * 64!r} is not a valid label value (at most 63 characters)"]
    assert broken(service, ("metadata",), lambda m: m.update(name="1-" + m["name"])) == \
        ["metadata.name: must be a DNS-1035 label (a Service's DNS name)"]
    assert schema_errors({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}) == \
        ["no schema known for v1 Pod"]


def test_crd_defaulting_matches_the_api_server_stand_in():
    docs = manifests(str(REPO / "examples"))
    assert len(docs) > 20
    for doc in docs:
        schema = crd(doc["kind"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        mine, server = copy.deepcopy(doc), copy.deepcopy(doc)
        apply_defaults(schema, mine)
        Schema(schema).default(server)
        assert mine == server, doc["metadata"]["name"]


def test_help_lists_render_and_its_operator_flags(capsys):
    with pytest.raises(SystemExit):
        main(["render", "--help"])
    text = capsys.readouterr().out
    for flag in ("--namespace", "--output", "--placeholders", "--image", "--default-output-root", "--staging-claim",
                 "--progress-url", "--default-cpu-request", "--default-memory-request", "--hf-token-secret"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "render" in capsys.readouterr().out
