"""What the operator would create for a set of manifests, computed without a cluster (``branchmerge render``).

Each CR goes through the operator's own decision, ``plan.plan`` on a CR that has just been created and has
no children yet, so the objects are attempt 1's ConfigMap, Service (multi-pod runs) and Job exactly as the
operator builds them. What the operator would read from the cluster is reproduced:

- the CR as the API server stores it: the CRD's structural defaults applied (they are part of the resolved
  spec, so of the run hash in every child's name), in its namespace, with generation 1 and, for want of a
  real one, a placeholder uid (``placeholder_uid``) that ends up in the ownerReferences;
- each upstream as succeeded, with the output URI the operator will give it: the operator sets an
  upstream's ``status.output.uri`` to the output URI it resolved for it (``spec.output.uri`` or the
  ``--default-output-root`` path), so a downstream's inputs, run hash, names and read-only volumes are
  known before anything ran. ``placeholders=True`` writes ``<output of Kind/name>`` instead (then names and
  volumes differ from what the operator creates); an upstream that cannot run gets one regardless.

``schema_errors`` checks every object against the Kubernetes API types of the ``kubernetes`` client (the
operator extra; its models are generated from the Kubernetes OpenAPI and forbid unknown fields): unknown
fields, snake_case spellings the API would not read (by a round trip), types and required fields at every
level. Then ``api_rule_errors``, a few of the API server's semantic rules: object names, label keys and
values, container and volume names, volume mounts naming a volume, requests <= limits, extended resources
(GPUs) whole and with request == limit. Not checked: the rest of the server's validation (env var names,
port ranges, enum values such as restartPolicy, immutability on update), built-in defaulting, admission
(ResourceQuota, LimitRange, PodSecurity, Kueue's and other webhooks), whether the PVCs, Secrets, queues and
PriorityClasses exist, and whether any node fits the pod. The models type quantities as strings, so a bare
number (which the API accepts) would be reported; the operator always writes strings.
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache

from ..api.crdgen import crd
from ..api.graph import references
from ..api.resources import CustomResource
from ..api.validation import _schema_errors, format_path
from .pods.resources import quantity
from .pods.run import Run
from .options import OperatorOptions
from .plan import Blocked, Observed, plan, target


def placeholder_uid(key: str) -> str:
    """The uid written into ownerReferences: the real one exists only once the CR has been created."""
    return f"<uid of {key}>"


def placeholder_output(key: str) -> str:
    return f"<output of {key}>"


@dataclass
class Rendered:
    """The children of one CR's first attempt and where its upstream inputs come from."""

    key: str  # Kind/name
    run: Run
    objects: list[dict]
    inputs: list[tuple[str, str, str]] = field(default_factory=list)  # (field path, URI, upstream Kind/name)


class RenderError(ValueError):
    """Manifests the operator would not turn into children; ``errors`` lists one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


# ---- the CR as the operator reads it -----------------------------------------------------------------

@lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict:
    return crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(node: dict, value) -> None:
    """kube-apiserver's structural defaulting, in place: an absent field (or a null one that may not be
    null) gets its schema default, which is then defaulted in turn; other non-nullable nulls are pruned."""
    if isinstance(value, dict):
        props = node.get("properties") or {}
        for key, child in props.items():
            if value.get(key) is None and not child.get("nullable"):
                if "default" in child:
                    value[key] = copy.deepcopy(child["default"])
                else:
                    value.pop(key, None)
        extra = node.get("additionalProperties")
        for key, item in value.items():
            child = props.get(key, extra if isinstance(extra, dict) else None)
            if child is not None:
                apply_defaults(child, item)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            apply_defaults(node["items"], item)


def stored_cr(resource: CustomResource, namespace: str) -> dict:
    """The CR as a get right after ``kubectl apply`` returns it (server fields the operator ignores left out)."""
    doc = resource.model_dump(by_alias=True, exclude_unset=True, mode="json")
    doc.update(apiVersion=resource.api_version, kind=resource.kind)  # type: ignore[attr-defined]
    doc.pop("status", None)
    apply_defaults(_crd_schema(resource.kind), doc)  # type: ignore[attr-defined]
    doc["metadata"].update(namespace=namespace, uid=placeholder_uid(resource.key), generation=1)
    return doc


# ---- rendering ---------------------------------------------------------------------------------------

def render(resources: list[CustomResource], opts: OperatorOptions, namespace: str | None = None,
           placeholders: bool = False) -> list[Rendered]:
    """The children of every CR, in the given order (pipeline order: upstreams first). ``namespace``: of CRs
    that name none (default "default"); a CR naming another one is an error, as with ``kubectl -n``.
    RenderError: what the operator would refuse (InvalidSpec, an upstream that cannot be found)."""
    outputs: dict[tuple[str, str], str | None] = {}  # (namespace, Kind/name) -> its output URI (None: cannot run)
    rendered, errors = [], []
    for resource in resources:
        own = resource.metadata.namespace
        if namespace and own and own != namespace:
            errors.append(f"{resource.key}: the namespace from the manifest ({own}) does not match the namespace "
                          f"given ({namespace})")
            continue
        ns = own or namespace or "default"
        if resource.kind == "MergeSearch":  # its children (Merge and Eval CRs) follow from trial results at run time
            outputs[(ns, resource.key)] = None  # the winner's output is known only then: a placeholder downstream
            continue
        cr = stored_cr(resource, ns)
        refs = references(resource)
        upstreams = _upstreams(refs, ns, outputs, placeholders)
        want = target(cr, upstreams, opts)
        if isinstance(want, Blocked):  # the status the operator would write instead of creating children
            errors.append(f"{resource.key}: {want.reason}: {want.message}")
            outputs[(ns, resource.key)] = None  # its downstreams still render, with a placeholder
            continue
        outputs[(ns, resource.key)] = want.spec["output"]["uri"]
        decided = plan(cr, upstreams, Observed(), opts, time.time(), want=want)
        inputs = [(ref.path[:-len(".from")], upstreams[ref.key]["uri"], ref.key) for ref in refs]
        rendered.append(Rendered(resource.key, want, decided.create, inputs))
    if errors:
        raise RenderError(errors)
    return rendered


def _upstreams(refs: list, namespace: str, outputs: dict, placeholders: bool) -> dict[str, dict]:
    """``target``'s view of the upstreams: each one succeeded, with the output URI the operator will have
    resolved for it. One in another namespace is absent: the operator looks in the CR's own (and waits)."""
    view = {}
    for ref in refs:
        if (namespace, ref.key) in outputs:
            uri = outputs[(namespace, ref.key)]
            view[ref.key] = {"phase": "Succeeded",
                             "uri": uri if uri and not placeholders else placeholder_output(ref.key)}
    return view


# ---- checks against Kubernetes -----------------------------------------------------------------------

MODELS = {("v1", "ConfigMap"): "V1ConfigMap", ("v1", "Service"): "V1Service", ("batch/v1", "Job"): "V1Job"}


def schema_errors(obj: dict) -> list[str]:
    """The object checked against the Kubernetes API type of its kind (the ``kubernetes`` client's models:
    unknown fields, types, required fields at every level), plus ``api_rule_errors``. ImportError: the
    client is not installed."""
    from kubernetes import client
    from pydantic import ValidationError

    name = MODELS.get((obj.get("apiVersion"), obj.get("kind")))
    if name is None:
        return [f"no schema known for {obj.get('apiVersion')} {obj.get('kind')}"]
    try:
        parsed = getattr(client, name).model_validate(obj)
    except ValidationError as err:
        return sorted({str(e) for e in _schema_errors(err)})
    # The models also accept snake_case names (image_pull_policy) that the API server rejects: the round
    # trip writes camelCase, so any difference is a field the server would not read as written.
    again = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{path}: not read back as written (not the API's spelling of the field?)"
            for path in _not_kept(obj, again)] + api_rule_errors(obj)


def _not_kept(written, read, path: str = "") -> list[str]:
    """Paths of ``written`` that ``read`` (its round trip through the API type) does not hold as written."""
    if isinstance(written, dict) and isinstance(read, dict):
        return [p for key, value in written.items()
                for p in _not_kept(value, read.get(key), f"{path}.{key}" if path else str(key))]
    if isinstance(written, list) and isinstance(read, list) and len(written) == len(read):
        return [p for i, (x, y) in enumerate(zip(written, read)) for p in _not_kept(x, y, f"{path}[{i}]")]
    return [] if written == read else [path or "."]


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(rf"{DNS_LABEL.pattern}(\.{DNS_LABEL.pattern})*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
NATIVE = ("cpu", "memory", "ephemeral-storage")  # overcommittable; everything with a "/" is extended


def api_rule_errors(obj: dict) -> list[str]:
    """A few of the API server's semantic checks (ValidateObjectMeta, ValidatePodSpec): names, labels, volume
    references, container names, requests against limits. Not the others (see the module's docstring)."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    errors = []
    if obj.get("kind") == "Service" and not (DNS_1035.fullmatch(name) and len(name) <= 63):
        errors.append("metadata.name: must be a DNS-1035 label (a Service's DNS name)")
    elif not (DNS_SUBDOMAIN.fullmatch(name) and len(name) <= (63 if obj.get("kind") == "Job" else 253)):
        errors.append("metadata.name: must be a DNS-1123 subdomain (a Job's at most 63 characters: its pods' label)")
    errors += _label_errors(meta.get("labels") or {}, "metadata.labels")
    template = (obj.get("spec") or {}).get("template") if obj.get("kind") == "Job" else None
    if template is not None:
        errors += _label_errors((template.get("metadata") or {}).get("labels") or {}, "spec.template.metadata.labels")
        errors += [f"spec.template.spec.{e}" for e in _pod_errors(template.get("spec") or {})]
    return errors


def _label_errors(labels: dict, path: str) -> list[str]:
    errors = []
    for key, value in labels.items():
        prefix, _, label = key.rpartition("/")
        if (prefix and not (DNS_SUBDOMAIN.fullmatch(prefix) and len(prefix) <= 253)) or \
                not (label and LABEL_VALUE.fullmatch(label) and len(label) <= 63):
            errors.append(f"{path}[{key}]: not a valid label key")
        if not (LABEL_VALUE.fullmatch(str(value)) and len(str(value)) <= 63):
            errors.append(f"{path}[{key}]: {value!r} is not a valid label value (at most 63 characters)")
    return errors


def _pod_errors(pod: dict) -> list[str]:
    errors = []
    volumes = [v.get("name") for v in pod.get("volumes") or []]
    errors += [f"volumes: duplicate name {n!r}" for n in sorted({n for n in volumes if volumes.count(n) > 1})]
    groups = [("initContainers", pod.get("initContainers") or []), ("containers", pod.get("containers") or [])]
    names = [c.get("name") for _, group in groups for c in group]
    errors += [f"containers: duplicate name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    for field_name, group in groups:
        for i, container in enumerate(group):
            where = format_path([field_name, i])
            if not DNS_LABEL.fullmatch(container.get("name") or "") or len(container.get("name") or "") > 63:
                errors.append(f"{where}.name: must be a DNS-1123 label")
            for j, mount in enumerate(container.get("volumeMounts") or []):
                if mount.get("name") not in volumes:
                    errors.append(f"{where}.volumeMounts[{j}].name: no volume named {mount.get('name')!r}")
            errors += [f"{where}.resources.{e}" for e in _resource_errors(container.get("resources") or {})]
    return errors


def _resource_errors(resources: dict) -> list[str]:
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    errors = []
    for name in sorted(set(requests) | set(limits)):
        try:
            asked, cap = (quantity(requests[name]) if name in requests else None,
                          quantity(limits[name]) if name in limits else None)
        except ValueError as err:
            errors.append(f"{name}: {err}")
            continue
        if asked is not None and cap is not None and asked > cap:
            errors.append(f"requests[{name}]: must be less than or equal to the limit")
        if "/" in name and not name.startswith("kubernetes.io/") and name not in NATIVE:
            # extended resources (GPUs, RDMA devices) cannot be overcommitted: whole units, request == limit
            if cap is None or (asked is not None and asked != cap) or cap.denominator != 1:
                errors.append(f"limits[{name}]: an extended resource needs a whole-number limit equal to its request")
    return errors
