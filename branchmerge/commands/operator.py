"""``branchmerge operator``: run the Kubernetes operator (kopf) for TeacherGen, BranchSFT, Merge and Eval."""
from __future__ import annotations

import os
import random
import re
import sys

# A namespace name (DNS-1123 label). kopf would take "team-*", "!x" or "a,b" as patterns, but with scanning
# disabled (no cluster-wide list/watch of namespaces, see controller.settings) it silently serves only
# exact names, so a pattern would serve nothing. Patterns are refused instead of watching namespaces: a
# namespaced install grants a Role per served namespace, which a namespace created later would not have.
NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def register(sub) -> None:
    p = sub.add_parser("operator", help="run the Kubernetes operator (reconciles the CRs into Jobs)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="serve this namespace (repeatable; exact names: for a changing set of namespaces "
                            "use --all-namespaces)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="serve the whole cluster")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0: off)")
    p.add_argument("--metrics-addr", default="0.0.0.0")
    p.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", metavar="URL",
                   help="kopf liveness endpoint ('' disables)")
    p.add_argument("--peering", metavar="NAME",
                   help="kopf peering object for leader election between replicas (default: standalone)")
    p.add_argument("--priority", type=int,
                   help="peering priority; the highest live replica works (default: random, so replicas differ)")
    add_children_flags(p)
    p.add_argument("--progress-port", type=int, default=8082, help="port of the progress endpoint")
    p.add_argument("--progress-addr", default="0.0.0.0")
    p.add_argument("--pending-deadline", type=float, default=900.0, metavar="SECONDS",
                   help="fail an attempt whose pods a problem (quota, unschedulable, image pull, missing Secret) "
                        "kept from starting this long (0: never)")
    p.add_argument("--pending-recheck", type=float, default=10.0, metavar="SECONDS",
                   help="how often a CR whose pods are held up looks at them again")
    p.add_argument("--workers", type=int, default=8, help="concurrent reconciles")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account, then $KUBECONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)


def add_children_flags(p) -> None:
    """The flags that shape the children (images, storage, requests, progress), shared with
    ``branchmerge render``, which must build what this operator builds."""
    p.add_argument("--image", help="trainer image for pods whose spec has none")
    p.add_argument("--default-output-root", metavar="pvc://CLAIM/PREFIX",
                   help="where outputs go when spec.output.uri is absent")
    p.add_argument("--hf-token-secret", metavar="NAME[/KEY]",
                   help="Secret with the Hugging Face token for hf:// staging (per CR: annotation "
                        "branchmerge.dev/hf-token-secret)")
    p.add_argument("--staging-claim", metavar="PVC", help="PVC caching staged hf:// inputs (default: emptyDir)")
    p.add_argument("--progress-url", metavar="URL",
                   help="live progress: the URL pods reach this operator's progress endpoint at, e.g. "
                        "http://branchmerge-operator.branchmerge-system.svc:8082/progress (default: off)")
    p.add_argument("--progress-interval", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between two progress reports of one pod")
    p.add_argument("--default-cpu-request", metavar="QUANTITY",
                   help="CPU request of stage containers whose CR sets no spec.resources.cpu (default: 500m; "
                        "'none': no request)")
    p.add_argument("--default-memory-request", metavar="QUANTITY",
                   help="memory request of stage containers whose CR sets no spec.resources.memory, to which "
                        "the /dev/shm size is added (default: 2Gi; 'none': no request)")


def namespace_errors(namespaces: list[str]) -> list[str]:
    """Why each ``--namespace`` value cannot be served (empty: all are plain namespace names)."""
    errors = []
    for ns in namespaces:
        if NAMESPACE.fullmatch(ns) and len(ns) <= 63:
            continue
        if any(ch in ns for ch in "*?[!,"):
            errors.append(f"--namespace {ns!r}: namespace patterns are not supported; list each namespace "
                          "(--namespace a --namespace b), or serve all of them with --all-namespaces")
        else:
            errors.append(f"--namespace {ns!r}: not a namespace name (lowercase letters, digits and '-', "
                          "at most 63 characters)")
    return errors


def options_from_args(args):
    """The OperatorOptions the flags ask for (ValueError: a flag's value is malformed)."""
    from branchmerge.operator.pods.resources import quantity
    from branchmerge.operator.options import OperatorOptions

    defaults = OperatorOptions()
    requests = {}
    for field in ("default_cpu_request", "default_memory_request"):
        value = getattr(args, field, None)
        if value is None:
            continue
        if value.lower() in ("none", ""):
            requests[field] = None
            continue
        try:
            quantity(value)
        except ValueError:
            raise ValueError(f"--{field.replace('_', '-')} {value!r}: not a Kubernetes quantity "
                             "(e.g. 500m, 4Gi)") from None
        requests[field] = value
    return OperatorOptions(
        image=args.image or defaults.image, default_output_root=args.default_output_root,
        hf_token_secret=args.hf_token_secret, staging_claim=args.staging_claim,
        progress_url=args.progress_url, progress_interval_seconds=args.progress_interval,
        # render has no pending flags: they decide when to give up on pods, not what the children are
        pending_deadline_seconds=getattr(args, "pending_deadline", defaults.pending_deadline_seconds),
        pending_recheck_seconds=getattr(args, "pending_recheck", defaults.pending_recheck_seconds), **requests)


def _connector(kubeconfig: str | None):
    """Log in like kopf does, once per (re)authentication: service account in a pod, else kubeconfig."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig

    async def connect():
        import logging

        import kopf

        settings = kopf.OperatorSettings()
        info = None
        if not kubeconfig:
            info = kopf.login_with_service_account(settings=settings)
        if info is None:
            try:
                info = kopf.login_with_kubeconfig(settings=settings)
            except Exception:  # exec plugins and the like: the official client knows them
                info = None
        if info is None:
            info = kopf.login_via_client(settings=settings, logger=logging.getLogger("branchmerge.operator"))
        if info is None:
            raise kopf.LoginError("no Kubernetes credentials: not in a pod and no kubeconfig")
        return info

    return connect


def run(args) -> int:
    if not args.all_namespaces and not args.namespace:
        print("branchmerge operator: give --namespace NS (repeatable) or --all-namespaces", file=sys.stderr)
        return 2
    bad = namespace_errors(args.namespace)
    if bad:
        print("\n".join(f"branchmerge operator: {line}" for line in bad), file=sys.stderr)
        return 2
    import asyncio
    import logging

    from branchmerge.operator.controller import Operator, run_operator
    from branchmerge.operator.metrics import serve_metrics

    try:
        opts = options_from_args(args)
    except ValueError as err:
        print(f"branchmerge operator: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    progress = (args.progress_addr, args.progress_port) if args.progress_url else None
    operator = Operator(opts, _connector(args.kubeconfig), workers=args.workers, progress_listen=progress)
    if args.metrics_port:
        serve_metrics(operator.metrics.registry, args.metrics_port, args.metrics_addr)
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    asyncio.run(run_operator(operator, namespaces=args.namespace, clusterwide=args.all_namespaces,
                             peering=args.peering, priority=priority, liveness=args.liveness or None))
    return 0
