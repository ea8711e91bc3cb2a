"""``branchmerge render -f PATH... [-n NS] [-o yaml|json]``: print the ConfigMaps, Services and Jobs the operator
would create for a set of manifests, checked against the Kubernetes API types (operator/render.py)."""
from __future__ import annotations

import json
import sys

DESCRIPTION = """\
Print every object the operator creates for these manifests, in pipeline order: per CR its ConfigMap (the
resolved spec), for multi-pod runs a headless Service, and the Job of attempt 1 (a retry creates the same Job
with the next attempt number in its name). Built by the operator's own code from the CR as the API server
stores it (CRD defaults applied); a from: input is the output URI the operator will resolve once that upstream
has succeeded (--placeholders: <output of Kind/name>). ownerReferences carry a placeholder uid. Every object is
checked against the Kubernetes API types (the kubernetes client's models: unknown fields, types, required
fields) and some API-server rules (names, labels, volume mounts, requests vs limits); admission (quota,
PodSecurity, webhooks) and the nodes are not. Pass the flags your operator runs with (its Deployment's args;
deploy/operator/operator.yaml sets --image and --progress-url) to see exactly its objects. Exit 2: the
manifests are invalid (validate's errors) or the operator would refuse a CR; exit 1: an object fails the
Kubernetes checks."""


def register(sub) -> None:
    from branchmerge.commands.operator import add_children_flags

    p = sub.add_parser("render", help="print the ConfigMaps, Services and Jobs the operator would create",
                       description=DESCRIPTION)
    p.add_argument("-f", "--filename", action="append", required=True, metavar="PATH",
                   help="a manifest file or a folder of them (repeatable)")
    p.add_argument("-n", "--namespace", metavar="NS",
                   help="namespace of manifests that name none (default: default); one naming another is an error")
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml",
                   help="multi-document YAML with comments (default) or a JSON v1 List")
    p.add_argument("--placeholders", action="store_true",
                   help="write from: inputs as <output of Kind/name> (names and volumes then differ from the "
                        "operator's)")
    add_children_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from branchmerge.api.manifests import load
    from branchmerge.commands.operator import namespace_errors, options_from_args
    from branchmerge.commands.validate import rejection
    from branchmerge.operator.render import RenderError, render

    bad = namespace_errors([args.namespace]) if args.namespace else []
    if bad:
        return _fail([f"error: {line}" for line in bad], 2)
    try:
        opts = options_from_args(args)
    except ValueError as err:
        return _fail([f"error: {err}"], 2)
    manifests = load(args.filename)
    rejected = rejection(manifests)
    if rejected:  # validate's very lines; exit 2 as every "cannot render" here
        return _fail(rejected, 2)
    dag = manifests.dag()
    try:
        rendered = render([dag.resources[key] for key in dag.order()], opts, args.namespace, args.placeholders)
    except RenderError as err:  # what the operator would write to the CRs' status instead
        return _fail([f"error: {line}" for line in err.errors] + [f"{len(err.errors)} error(s)"], 2)
    try:
        problems = check(rendered)
    except ImportError:
        return _fail(["error: checking objects against the Kubernetes API types needs the kubernetes package "
                      "(pip install 'branchmerge[operator]')"], 2)
    if problems:
        return _fail([f"error: {line}" for line in problems] + [f"{len(problems)} error(s)"], 1)
    print(to_json(rendered) if args.output == "json" else to_yaml(rendered, opts), end="")
    return 0


def _fail(lines: list[str], code: int) -> int:
    print("\n".join(lines), file=sys.stderr)
    return code


def check(rendered) -> list[str]:
    """``Kind/name: field: problem`` for every object failing the Kubernetes checks."""
    from branchmerge.operator.render import schema_errors

    return [f"{obj['kind']}/{obj['metadata']['name']}: {error}"
            for item in rendered for obj in item.objects for error in schema_errors(obj)]


def to_json(rendered) -> str:
    items = [obj for item in rendered for obj in item.objects]
    return json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items},
                      indent=2) + "\n"


def to_yaml(rendered, opts) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:  # objects sharing a dict print it twice, not as &id001/*id001
            return True

    def text(dumper, value: str):  # the ConfigMap's spec.yaml stays readable: a block, not one escaped line
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    total = sum(len(item.objects) for item in rendered)
    out = [f"# branchmerge render: {total} object(s) the operator creates for {len(rendered)} CR(s), in pipeline "
           "order.\n",
           f"# Operator settings: image {opts.image}, default requests cpu {opts.default_cpu_request} / memory "
           f"{opts.default_memory_request}, progress URL {opts.progress_url or 'off'}, default output root "
           f"{opts.default_output_root or 'none'}.\n",
           "# ownerReferences[].uid is a placeholder: the API server assigns each CR's uid when it is created.\n"]
    for item in rendered:
        for i, obj in enumerate(item.objects):
            notes = "".join(f"{line}\n" for line in _notes(item)) if i == 0 else ""  # heads the CR's first object
            out.append("---\n" + notes + yaml.dump(obj, Dumper=Dumper, sort_keys=False, width=120))
    return "".join(out)


def _notes(item) -> list[str]:
    """The comment block above a CR's objects: which run, what a retry creates, where the inputs come from."""
    run = item.run
    limit = int(run.run_policy.get("backoffLimit", 3))
    lines = [f"# ---- {item.key} in namespace {run.namespace}: run {run.run_hash}, attempt 1 of at most {limit + 1}"]
    if limit:
        lines.append(f"# A retry creates the same Job{' and Service' if run.pods > 1 else ''} as {run.job_name(2)}, "
                     f"{run.job_name(3)}, ... (label branchmerge.dev/attempt); the ConfigMap is the run's, kept.")
    lines += [f"# {path}.uri = {uri}: the output of {key}, which must succeed first" for path, uri, key in item.inputs]
    return lines
