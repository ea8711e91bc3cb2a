"""hf:// inputs on the operator's side: the URI grammar ``hf://[datasets/|spaces/]org/name[@revision][/path]``
(api/common.py's pattern, then api/uris.py's parser, the one both the operator and the stages use), the
stage-input init containers built from it, and a staging failure reaching the CR's condition.
The commands themselves run against a local Hub in tests/trainer/test_staging.py."""
from __future__ import annotations

import re

import pytest

from branchmerge.api.common import URI_PATTERN
from branchmerge.api.conditions import get_condition
from branchmerge.api.uris import InvalidHfUri, UnresolvableUri, local_path, parse_hf_uri, staged_name
from branchmerge.operator.options import OperatorOptions
from branchmerge.operator.plan import Observed, plan, target
from branchmerge.operator.pods.job import build_job
from branchmerge.operator.pods.staging import STAGING_ROOT, staging_command

from .kube_objects import MERGE_SPEC, cr, finish_job

OPTS = OperatorOptions(hf_token_secret="hf-secret", staging_claim="hf-cache")
T0 = 1_767_225_600.0

# uri -> (repo type, repo id, revision, subpath), and the staging command's arguments after DEST
VALID = [
    ("hf://org/name", ("model", "org/name", None, ""), []),
    ("hf://org/name@main", ("model", "org/name", "main", ""), []),
    ("hf://models/org/name@v1.0", ("model", "org/name", "v1.0", ""), []),
    ("hf://Qwen/Qwen2.5-7B-Instruct@a1b2c3d4e5f60718293a4b5c6d7e8f9012345678",
     ("model", "Qwen/Qwen2.5-7B-Instruct", "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678", ""), []),
    ("hf://datasets/open-r1/OpenR1-Math-220k", ("dataset", "open-r1/OpenR1-Math-220k", None, ""),
     ["--repo-type", "dataset"]),
    ("hf://datasets/open-r1/OpenR1-Math-220k@main/data", ("dataset", "open-r1/OpenR1-Math-220k", "main", "data"),
     ["--repo-type", "dataset", "--subpath", "data"]),
    ("hf://datasets/open-thoughts/OpenThoughts-114k/data/train-00000-of-00006.parquet",
     ("dataset", "open-thoughts/OpenThoughts-114k", None, "data/train-00000-of-00006.parquet"),
     ["--repo-type", "dataset", "--subpath", "data/train-00000-of-00006.parquet"]),
    # the refs the Hub names with a '/' are read whole; any other '/' in a revision is written %2F
    ("hf://datasets/org/name@refs/pr/12/data", ("dataset", "org/name", "refs/pr/12", "data"),
     ["--repo-type", "dataset", "--subpath", "data"]),
    ("hf://datasets/org/name@refs/convert/parquet", ("dataset", "org/name", "refs/convert/parquet", ""),
     ["--repo-type", "dataset"]),
    ("hf://org/name@feature%2Fbig-vocab/tokenizer", ("model", "org/name", "feature/big-vocab", "tokenizer"),
     ["--subpath", "tokenizer"]),
    ("hf://spaces/org/app@v2/weights", ("space", "org/app", "v2", "weights"),
     ["--repo-type", "space", "--subpath", "weights"]),
    ("hf://org/name/checkpoints/step@100", ("model", "org/name", None, "checkpoints/step@100"),
     ["--subpath", "checkpoints/step@100"]),  # an '@' past the repository belongs to the path
    ("hf://org/name/sub/", ("model", "org/name", None, "sub"), ["--subpath", "sub"]),
]

# uri -> who rejects it (the API's pattern: at admission; the parser: the operator fails the CR), message part
INVALID = [
    ("hf://org", "api", "must match"),
    ("hf://org/name@", "api", "must match"),
    ("hf://org/name@/data", "api", "must match"),
    ("hf://org/na me", "api", "must match"),
    ("hf://org/name@main/data x", "api", "must match"),
    ("hf://datasets/org", "operator", "expected hf://[datasets/|spaces/]org/name[@revision][/path], got "
                                      "repository 'org'"),
    ("hf://dataset/org/name", "operator", "the type prefix is plural: hf://datasets/"),
    ("hf://buckets/org/name", "operator", "buckets are not staged"),
    ("hf://org/-name", "operator", "'-name' is not a repository or organization name"),
    ("hf://org/na--me", "operator", "'na--me' is not a repository"),
    ("hf://org/name.git", "operator", "'name.git' is not a repository"),
    ("hf://org/name/../other/x", "operator", "must not have empty, '.' or '..' parts"),
    ("hf://datasets/org/name@main//data", "operator", "must not have empty, '.' or '..' parts"),
]


def _merge(uri: str) -> dict:
    return cr("Merge", "m", {"method": "linear", "models": [{"uri": uri}, {"uri": "pvc://models/b"}],
                             "output": {"uri": "pvc://models/merged"}})


@pytest.mark.parametrize("uri,parts,args", VALID, ids=[v[0] for v in VALID])
def test_valid_uris_parse_and_stage_with_these_arguments(uri, parts, args):
    assert re.fullmatch(URI_PATTERN, uri)
    hf = parse_hf_uri(uri)
    assert (hf.repo_type, hf.repo_id, hf.revision, hf.subpath) == parts
    assert parse_hf_uri(hf.uri()) == hf  # the canonical spelling means the same
    run = target(_merge(uri), {}, OPTS)
    assert not hasattr(run, "reason"), run
    assert staging_command(uri) == ["python", "-m", "branchmerge.trainer.staging", hf.repo_id, hf.revision or "",
                                    f"{STAGING_ROOT}/{staged_name(uri)}", *args]


@pytest.mark.parametrize("uri", [v[0] for v in VALID])
def test_the_grammar_is_huggingface_hubs(uri):
    """Same split as huggingface_hub's own parser (HfFileSystem paths, ``hf://`` URIs)."""
    hub_parse = pytest.importorskip("huggingface_hub.utils").parse_hf_uri
    theirs, ours = hub_parse(uri), parse_hf_uri(uri)
    assert (theirs.type, theirs.id, theirs.revision, theirs.path_in_repo) == \
           (ours.repo_type, ours.repo_id, ours.revision, ours.subpath)


@pytest.mark.parametrize("uri,who,fragment", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_uris_fail_the_cr_at_their_field(uri, who, fragment):
    assert bool(re.fullmatch(URI_PATTERN, uri)) == (who == "operator")
    blocked = target(_merge(uri), {}, OPTS)
    assert blocked.phase == "Failed" and blocked.reason == "InvalidSpec"
    assert "spec.models[0].uri" in blocked.message and fragment in blocked.message, blocked.message
    if who == "operator":
        with pytest.raises(InvalidHfUri):
            parse_hf_uri(uri)


def test_stage_input_init_containers_for_a_dataset_subpath_and_a_model():
    doc = cr("BranchSFT", "sft", {"base": {"uri": "hf://org/base@main"},
                                  "data": [{"uri": "hf://datasets/open-r1/OpenR1-Math-220k@main/data"},
                                           {"uri": "hf://datasets/open-r1/OpenR1-Math-220k@main/data"}],
                                  "training": {"globalBatchSize": 8, "microBatchSize": 1},
                                  "output": {"uri": "pvc://models/sft"}})
    pod = build_job(target(doc, {}, OPTS), 1, OPTS)["spec"]["template"]["spec"]
    inits = [c for c in pod["initContainers"] if c["name"].startswith("stage-input")]
    assert [c["name"] for c in inits] == ["stage-input-0", "stage-input-1"]  # one per distinct input
    model, data = (c["command"][3:] for c in inits)
    assert model == ["org/base", "main", f"{STAGING_ROOT}/{staged_name('hf://org/base@main')}"]  # older images too
    assert data[:2] == ["open-r1/OpenR1-Math-220k", "main"] and data[3:] == [
        "--repo-type", "dataset", "--subpath", "data"]
    for c in inits:
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert env["BRANCHMERGE_TERMINATION_LOG"] == c["terminationMessagePath"] == "/dev/termination-log"
        assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-secret", "key": "token"}}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["staging"] == {"name": "staging", "persistentVolumeClaim": {"claimName": "hf-cache"}}


def test_the_stage_reads_the_subpath_of_the_staged_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHMERGE_STAGING_ROOT", str(tmp_path))
    uri = "hf://datasets/org/name@refs/pr/3/data/train.parquet"
    (tmp_path / staged_name(uri) / "data").mkdir(parents=True)
    assert local_path(uri) == tmp_path / staged_name(uri) / "data" / "train.parquet"
    with pytest.raises(UnresolvableUri, match="must be staged by the control plane"):
        local_path("hf://org/not-staged")
    with pytest.raises(UnresolvableUri, match="the type prefix is plural"):
        local_path("hf://dataset/org/name")


def _failed_init(job: dict, code: int, message: str) -> dict:
    name = job["metadata"]["name"]
    return {name: [{"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": f"{name}-0-abcde", "namespace": "ns", "labels": {"branchmerge.dev/job": name}},
                    "status": {"phase": "Failed", "initContainerStatuses": [
                        {"name": "stage-input-0", "state": {"terminated": {"exitCode": code, "message": message,
                                                                           "reason": "Error"}}}],
                               "containerStatuses": [{"name": "stage", "state": {"waiting": {
                                   "reason": "PodInitializing"}}}]}}]}


@pytest.mark.parametrize("code,phase,reason", [(2, "Failed", "InvalidSpec"), (3, "Running", "Retrying")])
def test_a_staging_failure_reaches_the_crs_condition(code, phase, reason):
    message = ("staging hf://datasets/org/gated failed: HTTP 401 GatedRepoError: Access to dataset org/gated is "
               "restricted." if code == 2 else
               "staging hf://datasets/org/down failed: HTTP 500 HfHubHTTPError: Internal Error")
    doc = _merge("hf://datasets/org/gated" if code == 2 else "hf://datasets/org/down")
    doc["spec"]["runPolicy"] = {"backoffLimit": 2}
    first = plan(doc, {}, Observed(), OPTS, T0)
    doc["status"] = first.status
    job = first.create[-1]
    p = plan(doc, {}, Observed(jobs=[finish_job(job, False)], pods=_failed_init(job, code, message)), OPTS, T0 + 1)
    ready = get_condition(p.status, "Ready")
    assert p.status["phase"] == phase and ready["reason"] == reason and message in ready["message"], ready


def test_allow_patterns_make_a_copy_of_their_own_and_reach_the_command():
    """A ref's allowPatterns select files: the same URI with other patterns is another copy (it may hold less
    than the other ref needs), the same patterns in another order are the same copy."""
    weights = ["*.safetensors", "*.json", "tokenizer*"]
    doc = cr("Merge", "m", {"method": "linear", "output": {"uri": "pvc://models/merged"},
                            "base": {"uri": "hf://org/base@main", "allowPatterns": weights},
                            "models": [{"uri": "hf://org/base@main", "allowPatterns": weights[::-1]},
                                       {"uri": "hf://org/base@main"},
                                       {"uri": "hf://datasets/org/d@v1/data", "allowPatterns": ["train-*.parquet"]}]})
    run = target(doc, {}, OPTS)
    pod = build_job(run, 1, OPTS)["spec"]["template"]["spec"]
    inits = [c["command"][3:] for c in pod["initContainers"] if c["name"].startswith("stage-input")]
    dest = [f"{STAGING_ROOT}/{staged_name('hf://org/base@main', weights)}",
            f"{STAGING_ROOT}/{staged_name('hf://org/base@main')}",
            f"{STAGING_ROOT}/{staged_name('hf://datasets/org/d@v1/data', ['train-*.parquet'])}"]
    assert inits == [
        ["org/base", "main", dest[0], "--allow-pattern", "*.json", "--allow-pattern", "*.safetensors",
         "--allow-pattern", "tokenizer*"],
        ["org/base", "main", dest[1]],
        ["org/d", "v1", dest[2], "--repo-type", "dataset", "--subpath", "data", "--allow-pattern", "train-*.parquet"]]
    assert len(set(dest)) == 3 and staged_name("hf://org/base@main", weights[::-1]) == dest[0].split("/")[-1]
    # the patterns and the subpath make snapshot_download's selection
    assert parse_hf_uri("hf://datasets/org/d@v1/data").allow_patterns(["train-*.parquet", "extra/"]) == [
        "data/train-*.parquet", "data/extra/*"]
    assert parse_hf_uri("hf://org/base").allow_patterns(["*.json"]) == ["*.json"]


@pytest.mark.parametrize("spec,needle", [
    ({**MERGE_SPEC, "output": {"uri": "s3://bucket/out"}}, "s3:// outputs"),
    ({**MERGE_SPEC, "models": [{"uri": "s3://b/m"}, {"uri": "pvc://m/b"}]}, "s3:// inputs"),
    ({k: v for k, v in MERGE_SPEC.items() if k != "output"}, "spec.output.uri"),
])
def test_unsupported_storage_is_a_permanent_invalid_spec(spec, needle):
    blocked = target(cr("Merge", "x", spec), {}, OPTS)
    assert blocked.phase == "Failed" and blocked.reason == "InvalidSpec" and needle in blocked.message
