"""The built-in kinds the test cluster serves, with the parts of their REST strategies that matter to the
operator, the Job controller and the kubelet stand-ins:

- Namespace: ``status.phase`` Active, the ``kubernetes`` finalizer in ``spec.finalizers``, the
  ``kubernetes.io/metadata.name`` label; deletion moves it to Terminating (``testcluster.gc`` plays the
  namespace controller); names are DNS-1123 labels.
- Node: cluster-scoped, keeps the status it is created with (the kubelet registers with one).
- Pod: PodSpec defaults (restartPolicy, dnsPolicy, schedulerName, terminationGracePeriodSeconds,
  enableServiceLinks, container terminationMessagePath/Policy, imagePullPolicy, port protocol), status
  Pending with a QoS class on create, spec immutability except the fields kube-apiserver allows, the
  /status rule of podStatusStrategy (spec, ownerReferences and deletionTimestamp from the old object,
  labels/annotations may change), graceful deletion (bound and not terminal: ``deletionTimestamp`` +
  ``deletionGracePeriodSeconds``; unbound or terminal: removed at once), field selectors
  ``spec.nodeName``, ``spec.restartPolicy``, ``spec.schedulerName``, ``spec.serviceAccountName``,
  ``status.phase``, ``status.podIP``, ``status.nominatedNodeName``.
- ConfigMap / Secret: ``immutable: true`` (data changes and unsetting it → 422), key syntax, 1 MiB
  limit; Secret ``stringData`` folded into base64 ``data``, ``type`` defaulted to Opaque and immutable.
- Service: DNS-1035 names, ``clusterIP`` allocated from 10.96.0.0/12 unless ``None`` (headless),
  ``clusterIPs``/``ipFamilies``/``ipFamilyPolicy``/``sessionAffinity``/``type``/``internalTrafficPolicy``
  defaults, ``targetPort`` defaulted to ``port``, clusterIP immutable.
- PersistentVolumeClaim: Pending on create, then Bound (a fake volume ``pvc-<uid>``) in the next loop turn,
  as a PV controller with an immediate-binding default StorageClass would do.
- Event (core/v1) and events.k8s.io/v1 Event: one storage, converted between the two shapes; the
  ``involvedObject.*``, ``reason``, ``reportingComponent``, ``source``, ``type`` field selectors.
- Job (batch/v1): defaults (completions/parallelism 1 when both unset, parallelism 1, backoffLimit 6,
  completionMode NonIndexed, suspend false, podReplacementPolicy), the generated selector and template
  labels (``batch.kubernetes.io/controller-uid``, ``controller-uid``, ``batch.kubernetes.io/job-name``,
  ``job-name``), Job labels from the template when unset, restartPolicy OnFailure/Never, names of at most 63
  characters (the job-name label), immutable selector/completionMode/completions (NonIndexed)/template
  (except scheduling directives of a suspended Job that never started), orphaning as the default deletion
  propagation of batch/v1, field selector ``status.successful``.
- PriorityClass (scheduling.k8s.io/v1, cluster-scoped): ``value`` (at most 1000000000), ``globalDefault`` (one
  only), ``preemptionPolicy`` (default PreemptLowerPriority; it and ``value`` immutable), ``system-`` names
  reserved; system-cluster-critical and system-node-critical exist from the start and cannot be deleted.
- ResourceQuota (v1): ``spec.hard`` quantities validated, ``status`` hard/used written by the server
  (testcluster/admission.py, which also enforces it on pod CREATE); ``scopes``/``scopeSelector`` are refused
  with 422 (not emulated) rather than silently ignored.
- Lease (coordination.k8s.io/v1), ServiceAccount (with the ``token`` subresource, TokenRequest), TokenReview
  (authentication.k8s.io/v1, create-only; both answered by testcluster/tokens.py), and
  CustomResourceDefinition (apiextensions.k8s.io/v1, written through ``ApiServer.install_crd``-equivalent logic).

Built-ins are NOT schema-validated beyond the rules listed: unknown fields are kept, types are not
checked, most cross-field validation (probes, volumes, resources, affinity...) is absent, and the only
admission plugins are NamespaceLifecycle (creating in a missing or terminating namespace) and, on pod
CREATE, ServiceAccount, Priority and ResourceQuota (testcluster/admission.py).
"""
from __future__ import annotations

import base64
import datetime
import ipaddress
import json

from . import meta as metav
from .resources import ResourceType, Strategy
from .schema import FieldError
from .store import jcopy


def _q(value) -> str:
    return json.dumps(value)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- Namespace / Node ---------------------------------------------------------------------------------------

class NamespaceStrategy(Strategy):
    status_subresource = True

    def name_errors(self, name):
        return metav.label_name_errors(name)

    def default(self, obj):
        name = (obj.get("metadata") or {}).get("name")
        if name:
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name

    def prepare_create(self, obj, ctx):
        obj["status"] = {"phase": "Active"}
        spec = obj.setdefault("spec", {})
        fins = spec.setdefault("finalizers", [])
        if "kubernetes" not in fins:
            fins.append("kubernetes")

    def prepare_update(self, new, old):
        super().prepare_update(new, old)
        new["spec"] = jcopy(old.get("spec") or {})  # spec.finalizers change only via /finalize

    extra_fields = frozenset({"status.phase"})

    def fields(self, obj):
        return {**super().fields(obj), "status.phase": (obj.get("status") or {}).get("phase", "")}


class NodeStrategy(Strategy):
    status_subresource = True

    def prepare_create(self, obj, ctx):
        pass  # a kubelet registers its node with a status

    extra_fields = frozenset({"spec.unschedulable"})

    def fields(self, obj):
        return {**super().fields(obj),
                "spec.unschedulable": "true" if (obj.get("spec") or {}).get("unschedulable") else "false"}


# ---- Pod ----------------------------------------------------------------------------------------------------

def default_pod_spec(spec: dict) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    if spec.get("serviceAccountName") and not spec.get("serviceAccount"):
        spec["serviceAccount"] = spec["serviceAccountName"]
    for key in ("containers", "initContainers"):
        for c in spec.get(key) or []:
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            image = c.get("image", "")
            tag = image.rsplit("/", 1)[-1]
            latest = "@" not in image and (":" not in tag or tag.endswith(":latest"))
            c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            for port in c.get("ports") or []:
                port.setdefault("protocol", "TCP")


def qos_class(spec: dict) -> str:
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    requests_any = limits_all = False
    guaranteed = True
    for c in containers:
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        if req or lim:
            requests_any = True
        for r in ("cpu", "memory"):
            if r not in lim or (r in req and req[r] != lim[r]):
                guaranteed = False
        limits_all = limits_all or bool(lim)
    if guaranteed and containers and limits_all:
        return "Guaranteed"
    return "Burstable" if requests_any else "BestEffort"


_POD_MUTABLE_MSG = ("pod updates may not change fields other than `spec.containers[*].image`,"
                    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions "
                    "to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it "
                    "was previously negative)")


class PodStrategy(Strategy):
    status_subresource = True
    return_deleted = True
    extra_fields = frozenset({"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                              "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"})

    def default(self, obj):
        default_pod_spec(obj.setdefault("spec", {}))

    def prepare_create(self, obj, ctx):
        obj["status"] = {"phase": "Pending", "qosClass": qos_class(obj.get("spec") or {})}

    def validate(self, obj):
        errs = []
        spec = obj.get("spec") or {}
        if not spec.get("containers"):
            errs.append(FieldError("spec.containers", "FieldValueRequired", "Required value"))
        names = set()
        for i, c in enumerate(spec.get("containers") or []):
            if not c.get("name"):
                errs.append(FieldError(f"spec.containers[{i}].name", "FieldValueRequired", "Required value"))
            elif c["name"] in names:
                errs.append(FieldError(f"spec.containers[{i}].name", "FieldValueDuplicate",
                                       f"Duplicate value: {_q(c['name'])}"))
            names.add(c.get("name"))
            if not c.get("image"):
                errs.append(FieldError(f"spec.containers[{i}].image", "FieldValueRequired", "Required value"))
        if spec.get("restartPolicy") not in ("Always", "OnFailure", "Never"):
            errs.append(FieldError("spec.restartPolicy", "FieldValueNotSupported",
                                   f"Unsupported value: {_q(spec.get('restartPolicy'))}: supported values: "
                                   '"Always", "OnFailure", "Never"'))
        if spec.get("hostname"):
            for problem in metav.label_name_errors(spec["hostname"]):
                errs.append(FieldError("spec.hostname", "FieldValueInvalid", f"Invalid value: {_q(spec['hostname'])}: "
                                       f"{problem}"))
        return errs

    def validate_update(self, new, old):
        errs = self.validate(new)
        a, b = jcopy(new.get("spec") or {}), jcopy(old.get("spec") or {})
        for spec in (a, b):
            for key in ("containers", "initContainers"):
                for c in spec.get(key) or []:
                    c.pop("image", None)
            spec.pop("activeDeadlineSeconds", None)
        old_tol = b.pop("tolerations", None) or []
        new_tol = a.pop("tolerations", None) or []
        if a.get("schedulingGates") != b.get("schedulingGates") and not a.get("nodeName"):
            if all(g in (b.get("schedulingGates") or []) for g in a.get("schedulingGates") or []):
                a.pop("schedulingGates", None)
                b.pop("schedulingGates", None)
        if a != b or any(t not in new_tol for t in old_tol):
            errs.append(FieldError("spec", "FieldValueForbidden", f"Forbidden: {_POD_MUTABLE_MSG}"))
        return errs

    def prepare_status_update(self, new, old):
        out = jcopy(new)
        out["spec"] = jcopy(old.get("spec"))
        meta = out.setdefault("metadata", {})
        for key in ("ownerReferences", "deletionTimestamp"):
            if key in old.get("metadata", {}):
                meta[key] = jcopy(old["metadata"][key])
            else:
                meta.pop(key, None)
        return out

    def fields(self, obj):
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        return {**super().fields(obj), "spec.nodeName": spec.get("nodeName", ""),
                "spec.restartPolicy": spec.get("restartPolicy", ""),
                "spec.schedulerName": spec.get("schedulerName", ""),
                "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                "spec.hostNetwork": "true" if spec.get("hostNetwork") else "false",
                "status.phase": status.get("phase", ""), "status.podIP": status.get("podIP", ""),
                "status.nominatedNodeName": status.get("nominatedNodeName", "")}

    def graceful_seconds(self, obj, requested):
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        if requested is not None:
            period = requested
        else:
            period = spec.get("terminationGracePeriodSeconds", 30)
        if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return 0  # never started or already done: nothing for a kubelet to stop
        return max(int(period), 0)


# ---- ConfigMap / Secret -------------------------------------------------------------------------------------

def _key_errors(data, path: str) -> list[FieldError]:
    import re
    errs = []
    for key in (data or {}):
        if not re.match(r"^[-._a-zA-Z0-9]+$", key) or len(key) > 253:
            errs.append(FieldError(path, "FieldValueInvalid", f"Invalid value: {_q(key)}: a valid config key must "
                                   "consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or "
                                   "'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"))
    return errs


class ConfigMapStrategy(Strategy):
    data_fields = ("data", "binaryData")

    def validate(self, obj):
        errs = []
        size = 0
        for f in self.data_fields:
            errs += _key_errors(obj.get(f), f)
            size += sum(len(k) + len(str(v)) for k, v in (obj.get(f) or {}).items())
        if size > 1024 * 1024:
            errs.append(FieldError("", "FieldValueTooLong", "Too long: must have at most 1048576 bytes"))
        return errs

    def validate_update(self, new, old):
        errs = self.validate(new)
        if old.get("immutable"):
            if not new.get("immutable"):
                errs.append(FieldError("immutable", "FieldValueForbidden",
                                       "Forbidden: field is immutable when `immutable` is set"))
            for f in self.data_fields:
                if (new.get(f) or {}) != (old.get(f) or {}):
                    errs.append(FieldError(f, "FieldValueForbidden",
                                           "Forbidden: field is immutable when `immutable` is set"))
        return errs


class SecretStrategy(ConfigMapStrategy):
    data_fields = ("data",)
    extra_fields = frozenset({"type"})

    def default(self, obj):
        obj.setdefault("type", "Opaque")
        string_data = obj.pop("stringData", None)
        if string_data:
            data = obj.setdefault("data", {})
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()

    def validate_update(self, new, old):
        errs = super().validate_update(new, old)
        if new.get("type") != old.get("type"):
            errs.append(FieldError("type", "FieldValueInvalid", f"Invalid value: {_q(new.get('type'))}: field is "
                                   "immutable"))
        return errs

    def fields(self, obj):
        return {**super().fields(obj), "type": obj.get("type", "")}


# ---- Service / PVC ------------------------------------------------------------------------------------------

class ServiceStrategy(Strategy):
    status_subresource = True

    def name_errors(self, name):
        return metav.dns1035_errors(name)

    def default(self, obj):
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))

    def prepare_create(self, obj, ctx):
        obj["status"] = {"loadBalancer": {}}
        spec = obj["spec"]
        if spec.get("clusterIP") != "None" and spec.get("type") != "ExternalName" and not spec.get("clusterIP"):
            spec["clusterIP"] = ctx.allocate_ip()
        if spec.get("clusterIP"):
            spec["clusterIPs"] = [spec["clusterIP"]]
        if spec.get("type") != "ExternalName":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")

    def prepare_update(self, new, old):
        super().prepare_update(new, old)
        spec, old_spec = new.setdefault("spec", {}), old.get("spec") or {}
        for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if key not in spec and key in old_spec:
                spec[key] = jcopy(old_spec[key])

    def validate(self, obj):
        errs = []
        spec = obj.get("spec") or {}
        for i, port in enumerate(spec.get("ports") or []):
            if not isinstance(port.get("port"), int) or not 1 <= port["port"] <= 65535:
                errs.append(FieldError(f"spec.ports[{i}].port", "FieldValueInvalid",
                                       f"Invalid value: {_q(port.get('port'))}: must be between 1 and 65535, "
                                       "inclusive"))
        ip = spec.get("clusterIP")
        if ip and ip != "None":
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                errs.append(FieldError("spec.clusterIPs[0]", "FieldValueInvalid", f"Invalid value: {_q(ip)}: must be "
                                       "a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"))
        return errs

    def validate_update(self, new, old):
        errs = self.validate(new)
        if (new.get("spec") or {}).get("clusterIP") != (old.get("spec") or {}).get("clusterIP"):
            errs.append(FieldError("spec.clusterIPs[0]", "FieldValueInvalid",
                                   f"Invalid value: {_q((new.get('spec') or {}).get('clusterIP'))}: may not change "
                                   "once set"))
        return errs


class PVCStrategy(Strategy):
    status_subresource = True

    def default(self, obj):
        obj.setdefault("spec", {}).setdefault("volumeMode", "Filesystem")

    def prepare_create(self, obj, ctx):
        obj["status"] = {"phase": "Pending"}
        ctx.after_commit(lambda server, o=obj: server.bind_claim(o))


# ---- Events: one storage, two API shapes --------------------------------------------------------------------

_EVENT_RENAMES = [("involvedObject", "regarding"), ("message", "note"), ("source", "deprecatedSource"),
                  ("firstTimestamp", "deprecatedFirstTimestamp"), ("lastTimestamp", "deprecatedLastTimestamp"),
                  ("count", "deprecatedCount"), ("reportingComponent", "reportingController")]


def event_to_core(obj: dict) -> dict:
    """events.k8s.io/v1 → the stored core/v1 shape."""
    out = {k: v for k, v in obj.items() if k not in {b for _, b in _EVENT_RENAMES}}
    for core, new in _EVENT_RENAMES:
        if new in obj:
            out[core] = obj[new]
    out["apiVersion"], out["kind"] = "v1", "Event"
    return out


def event_from_core(obj: dict) -> dict:
    out = {k: v for k, v in obj.items() if k not in {a for a, _ in _EVENT_RENAMES}}
    for core, new in _EVENT_RENAMES:
        if core in obj:
            out[new] = obj[core]
    out["apiVersion"], out["kind"] = "events.k8s.io/v1", "Event"
    return out


class EventStrategy(Strategy):
    extra_fields = frozenset({"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                              "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                              "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"})

    def validate(self, obj):
        errs = []
        involved = obj.get("involvedObject") or {}
        ns = (obj.get("metadata") or {}).get("namespace")
        if involved.get("namespace") and ns and involved["namespace"] != ns:
            errs.append(FieldError("involvedObject.namespace", "FieldValueInvalid",
                                   f"Invalid value: {_q(involved['namespace'])}: does not match event.namespace"))
        return errs

    def fields(self, obj):
        involved = obj.get("involvedObject") or {}
        out = super().fields(obj)
        for key in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath"):
            out[f"involvedObject.{key}"] = str(involved.get(key, ""))
        out["reason"] = obj.get("reason", "")
        out["reportingComponent"] = obj.get("reportingComponent", "")
        out["source"] = (obj.get("source") or {}).get("component", "")
        out["type"] = obj.get("type", "")
        return out


class EventsV1Strategy(EventStrategy):
    """The events.k8s.io view: field selectors name the stored core fields."""


# ---- Job ----------------------------------------------------------------------------------------------------

JOB_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid", "batch.kubernetes.io/job-name", "job-name")
_SCHEDULING = ("nodeSelector", "tolerations", "affinity", "schedulingGates")


class JobStrategy(Strategy):
    generation = True
    status_subresource = True
    default_gc = "Orphan"  # batch/v1 keeps the pods of a Job deleted without a propagationPolicy
    extra_fields = frozenset({"status.successful"})

    def name_errors(self, name):
        errs = metav.subdomain_errors(name)
        if len(name) > 63:  # it becomes the job-name label value
            errs.append("must be no more than 63 characters")
        return errs

    def default(self, obj):
        spec = obj.setdefault("spec", {})
        if spec.get("completions") is None and spec.get("parallelism") is None:
            spec["completions"] = 1
            spec["parallelism"] = 1
        spec.setdefault("parallelism", 1)
        if spec.get("backoffLimit") is None:
            spec["backoffLimit"] = 2**31 - 1 if spec.get("backoffLimitPerIndex") is not None else 6
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        if spec.get("podReplacementPolicy") is None:
            spec["podReplacementPolicy"] = "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed"
        template = spec.setdefault("template", {})
        labels = (template.get("metadata") or {}).get("labels")
        meta = obj.setdefault("metadata", {})
        if labels and not meta.get("labels"):
            meta["labels"] = dict(labels)
        default_pod_spec(template.setdefault("spec", {}))

    def prepare_create(self, obj, ctx):
        obj.pop("status", None)
        spec, meta = obj["spec"], obj["metadata"]
        if not spec.get("manualSelector"):
            uid, name = meta["uid"], meta["name"]
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            tmeta = spec["template"].setdefault("metadata", {})
            labels = tmeta.setdefault("labels", {})
            labels.update({"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                           "batch.kubernetes.io/job-name": name, "job-name": name})

    def validate(self, obj):
        errs = []
        spec = obj.get("spec") or {}
        tspec = (spec.get("template") or {}).get("spec") or {}
        policy = tspec.get("restartPolicy")
        if policy not in ("OnFailure", "Never"):
            errs.append(FieldError("spec.template.spec.restartPolicy", "FieldValueNotSupported",
                                   f'Unsupported value: {_q(policy)}: supported values: "OnFailure", "Never"'))
        for key in ("parallelism", "completions", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
            value = spec.get(key)
            if value is not None and (not isinstance(value, int) or value < 0):
                errs.append(FieldError(f"spec.{key}", "FieldValueInvalid",
                                       f"Invalid value: {_q(value)}: must be greater than or equal to 0"))
        mode = spec.get("completionMode")
        if mode not in ("NonIndexed", "Indexed"):
            errs.append(FieldError("spec.completionMode", "FieldValueNotSupported",
                                   f'Unsupported value: {_q(mode)}: supported values: "NonIndexed", "Indexed"'))
        if mode == "Indexed" and spec.get("completions") is None:
            errs.append(FieldError("spec.completions", "FieldValueRequired",
                                   "Required value: when completion mode is Indexed"))
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if spec.get("selector") is None:
            errs.append(FieldError("spec.selector", "FieldValueRequired", "Required value"))
        elif any(labels.get(k) != v for k, v in selector.items()):
            errs.append(FieldError("spec.template.metadata.labels", "FieldValueInvalid",
                                   f"Invalid value: {_q(labels)}: `selector` does not match template `labels`"))
        errs += metav.validate_labels(labels, "spec.template.metadata.labels")
        pod_errs = PodStrategy().validate({"spec": tspec})
        return errs + [FieldError("spec.template." + e.field, e.reason, e.detail) for e in pod_errs
                       if e.field != "spec.restartPolicy"]

    def validate_update(self, new, old):
        errs = self.validate(new)
        spec, ospec = new.get("spec") or {}, old.get("spec") or {}
        for key in ("selector", "completionMode", "manualSelector"):
            if spec.get(key) != ospec.get(key):
                errs.append(FieldError(f"spec.{key}", "FieldValueInvalid",
                                       f"Invalid value: {_q(spec.get(key))}: field is immutable"))
        if spec.get("completions") != ospec.get("completions"):
            elastic = spec.get("completionMode") == "Indexed" and spec.get("completions") == spec.get("parallelism")
            if not elastic:
                errs.append(FieldError("spec.completions", "FieldValueInvalid",
                                       f"Invalid value: {_q(spec.get('completions'))}: field is immutable"))
        t, ot = jcopy(spec.get("template") or {}), jcopy(ospec.get("template") or {})
        if t != ot:
            never_started = ospec.get("suspend") and not (old.get("status") or {}).get("startTime")
            if never_started:  # a suspended Job that never ran may change where its pods will run
                for tpl in (t, ot):
                    tpl.setdefault("metadata", {}).pop("labels", None)
                    tpl["metadata"].pop("annotations", None)
                    for key in _SCHEDULING:
                        tpl.setdefault("spec", {}).pop(key, None)
            if t != ot:
                errs.append(FieldError("spec.template", "FieldValueInvalid",
                                       "Invalid value: {...}: field is immutable"))
        return errs

    def fields(self, obj):
        return {**super().fields(obj), "status.successful": str((obj.get("status") or {}).get("succeeded", 0))}


# ---- PriorityClass / ResourceQuota -------------------------------------------------------------------------

class PriorityClassStrategy(Strategy):
    """scheduling.k8s.io/v1 PriorityClass: ``value`` required, at most 1000000000 unless a system class,
    ``system-`` names reserved, ``value`` and ``preemptionPolicy`` immutable."""

    def default(self, obj):
        obj.setdefault("preemptionPolicy", "PreemptLowerPriority")

    def validate(self, obj):
        from .admission import HIGHEST_USER_PRIORITY, SYSTEM_PRIORITY_CLASSES
        errs = []
        name = (obj.get("metadata") or {}).get("name") or ""
        value = obj.get("value")
        if name in SYSTEM_PRIORITY_CLASSES:
            if value != SYSTEM_PRIORITY_CLASSES[name]:
                errs.append(FieldError("metadata.name", "FieldValueInvalid", f"Invalid value: {_q(name)}: name "
                                       f"{name} is a reserved name for a system priority class"))
        elif name.startswith("system-"):
            errs.append(FieldError("metadata.name", "FieldValueInvalid", f"Invalid value: {_q(name)}: priority "
                                   "class names with 'system-' prefix are reserved"))
        if not isinstance(value, int) or isinstance(value, bool):
            errs.append(FieldError("value", "FieldValueRequired", "Required value"))
        elif value > HIGHEST_USER_PRIORITY and name not in SYSTEM_PRIORITY_CLASSES:
            errs.append(FieldError("value", "FieldValueForbidden", f"Forbidden: maximum allowed value of a user "
                                   f"defined priority is {HIGHEST_USER_PRIORITY}"))
        if obj.get("preemptionPolicy") not in ("PreemptLowerPriority", "Never"):
            errs.append(FieldError("preemptionPolicy", "FieldValueNotSupported",
                                   f"Unsupported value: {_q(obj.get('preemptionPolicy'))}: supported values: "
                                   '"Never", "PreemptLowerPriority"'))
        return errs

    def validate_update(self, new, old):
        errs = self.validate(new)
        for key in ("value", "preemptionPolicy"):
            if new.get(key) != old.get(key):
                errs.append(FieldError(key, "FieldValueForbidden", "Forbidden: may not be changed in an update."))
        return errs


class ResourceQuotaStrategy(Strategy):
    """v1 ResourceQuota: ``spec.hard`` values must be quantities; ``status`` (hard/used) is the server's
    (testcluster.admission keeps it current)."""
    status_subresource = True

    def prepare_create(self, obj, ctx):
        obj["status"] = {"hard": dict((obj.get("spec") or {}).get("hard") or {}), "used": {}}
        meta = obj["metadata"]
        ctx.after_commit(lambda server, ns=meta.get("namespace") or "": server.refresh_quotas(ns))

    def validate(self, obj):
        from .podspec import quantity
        errs = []
        for key, value in ((obj.get("spec") or {}).get("hard") or {}).items():
            try:
                if quantity(value) < 0:
                    errs.append(FieldError(f"spec.hard[{key}]", "FieldValueInvalid",
                                           f"Invalid value: {_q(value)}: must be greater than or equal to 0"))
            except (ValueError, TypeError, ZeroDivisionError):
                errs.append(FieldError(f"spec.hard[{key}]", "FieldValueInvalid",
                                       f"Invalid value: {_q(value)}: quantities must match the regular expression "
                                       "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"))
        scopes = (obj.get("spec") or {}).get("scopes") or (obj.get("spec") or {}).get("scopeSelector")
        if scopes:
            errs.append(FieldError("spec.scopes", "FieldValueNotSupported",
                                   "Unsupported value: quota scopes are not emulated by the test cluster"))
        return errs


# ---- CustomResourceDefinition -------------------------------------------------------------------------------

class CRDStrategy(Strategy):
    status_subresource = True
    generation = True

    def validate(self, obj):
        spec = obj.get("spec") or {}
        names = spec.get("names") or {}
        errs = []
        expected = f"{names.get('plural')}.{spec.get('group')}"
        if (obj.get("metadata") or {}).get("name") != expected:
            errs.append(FieldError("metadata.name", "FieldValueInvalid",
                                   f"Invalid value: {_q(obj['metadata'].get('name'))}: must be spec.names.plural+\".\"+"
                                   "spec.group"))
        if not spec.get("versions"):
            errs.append(FieldError("spec.versions", "FieldValueInvalid", "Invalid value: null: must have exactly one "
                                   "version marked as storage version"))
        return errs


# ---- the table ----------------------------------------------------------------------------------------------

def builtin_types() -> list[ResourceType]:
    events_v1 = ResourceType("events.k8s.io", "v1", "events", "Event", True, EventsV1Strategy(),
                             storage_key="/events", to_storage=event_to_core, from_storage=event_from_core)
    return [
        ResourceType("", "v1", "namespaces", "Namespace", False, NamespaceStrategy(), short_names=["ns"],
                     subresources=("status", "finalize")),
        ResourceType("", "v1", "nodes", "Node", False, NodeStrategy(), short_names=["no"], subresources=("status",)),
        ResourceType("", "v1", "pods", "Pod", True, PodStrategy(), short_names=["po"], categories=["all"],
                     subresources=("status", "binding", "log")),
        ResourceType("", "v1", "configmaps", "ConfigMap", True, ConfigMapStrategy(), short_names=["cm"]),
        ResourceType("", "v1", "secrets", "Secret", True, SecretStrategy()),
        ResourceType("", "v1", "services", "Service", True, ServiceStrategy(), short_names=["svc"],
                     categories=["all"], subresources=("status",)),
        ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, PVCStrategy(),
                     short_names=["pvc"], subresources=("status",)),
        ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, Strategy(), short_names=["sa"],
                     subresources=("token",)),
        # create-only, never stored (testcluster/tokens.py answers it)
        ResourceType("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, Strategy()),
        ResourceType("", "v1", "events", "Event", True, EventStrategy(), short_names=["ev"]),
        events_v1,
        ResourceType("batch", "v1", "jobs", "Job", True, JobStrategy(), categories=["all"], subresources=("status",)),
        ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True, Strategy()),
        ResourceType("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", False, PriorityClassStrategy(),
                     short_names=["pc"]),
        ResourceType("", "v1", "resourcequotas", "ResourceQuota", True, ResourceQuotaStrategy(),
                     short_names=["quota"], subresources=("status",)),
        ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
                     CRDStrategy(), short_names=["crd", "crds"], subresources=("status",)),
    ]
