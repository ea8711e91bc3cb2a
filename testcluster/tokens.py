"""Service account tokens: the TokenRequest subresource (``POST .../serviceaccounts/<sa>/token``, what the
kubelet calls for a projected ``serviceAccountToken`` volume source) and TokenReview (``POST
/apis/authentication.k8s.io/v1/tokenreviews``, what a server calls to authenticate a bearer token).

As kube-apiserver does for bound tokens: the token names its service account, audiences, expiry and the
pod it is bound to (``boundObjectRef``); a review checks the signature, the expiry, that one of the
review's audiences is among the token's, and that the bound pod still exists with the same uid (a token
of a deleted pod stops authenticating at once). The answer's ``user`` is
``system:serviceaccount:<ns>:<sa>`` with the groups and the ``extra`` keys
``authentication.kubernetes.io/pod-name`` / ``pod-uid`` / ``node-name`` a real server gives.

Not emulated: RS256 keys and the OIDC discovery documents (tokens are HS256 with a per-server secret, so
only this server can verify them), the ServiceAccount's own existence for ``default`` (there is no
ServiceAccount controller: ``default`` always exists), Secret-bound tokens, token rotation at 80% of the
lifetime (the kubelet writes a token once per pod start).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid

from .statuses import StatusError, bad_request

ISSUER = "https://kubernetes.default.svc.cluster.local"
MIN_EXPIRATION = 600  # kube-apiserver rejects shorter expirationSeconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tokens:
    def __init__(self, core) -> None:
        self.core = core
        self._key = os.urandom(32)

    def _sign(self, claims: dict) -> str:
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "testcluster"}).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        sig = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{_b64(sig)}"

    def _pod(self, namespace: str, name: str) -> dict | None:
        rt = self.core.type_for("", "v1", "pods")
        try:
            return self.core.get(rt, namespace, name).raw
        except StatusError:
            return None

    def request(self, namespace: str, sa: str, body: dict) -> dict:
        """TokenRequest: a signed token for ``sa``, bound to the pod named in ``spec.boundObjectRef``."""
        if sa != "default":
            self.core.get(self.core.type_for("", "v1", "serviceaccounts"), namespace, sa)  # 404 if missing
        spec = (body or {}).get("spec") or {}
        expiration = int(spec.get("expirationSeconds") or 3600)
        if expiration < MIN_EXPIRATION:
            raise StatusError(422, "Invalid", f"TokenRequest.authentication.k8s.io \"{sa}\" is invalid: "
                              f"spec.expirationSeconds: Invalid value: {expiration}: may not specify a duration "
                              f"less than {MIN_EXPIRATION} seconds")
        audiences = list(spec.get("audiences") or [ISSUER])
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": audiences, "sub": f"system:serviceaccount:{namespace}:{sa}",
                  "iat": now, "nbf": now, "exp": now + expiration, "jti": str(uuid.uuid4()),
                  "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": sa}}}
        ref = spec.get("boundObjectRef") or {}
        if ref:
            if ref.get("kind") != "Pod":
                raise bad_request(f"spec.boundObjectRef.kind: Unsupported value: {ref.get('kind')!r} "
                                  "(the test cluster binds tokens to pods only)")
            pod = self._pod(namespace, ref.get("name", ""))
            if pod is None or (ref.get("uid") and pod["metadata"].get("uid") != ref["uid"]):
                raise StatusError(404, "NotFound", f'pods "{ref.get("name")}" not found')
            claims["kubernetes.io"]["pod"] = {"name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                claims["kubernetes.io"]["node"] = {"name": node}
        token = self._sign(claims)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["exp"]))
        return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": sa, "namespace": namespace},
                "spec": {"audiences": audiences, "expirationSeconds": expiration, "boundObjectRef": ref or None},
                "status": {"token": token, "expirationTimestamp": stamp}}

    def review(self, body: dict) -> dict:
        """TokenReview: who the token is, or ``authenticated: false`` with the reason (never an HTTP error)."""
        spec = (body or {}).get("spec") or {}
        wanted = list(spec.get("audiences") or [ISSUER])
        status = self._verify(str(spec.get("token") or ""), wanted)
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {},
                "spec": {"audiences": wanted}, "status": status}

    def _verify(self, token: str, wanted: list[str]) -> dict:
        denied = lambda why: {"authenticated": False, "error": why}  # noqa: E731
        try:
            head, body, sig = token.split(".")
            expected = hmac.new(self._key, f"{head}.{body}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(sig)):
                return denied("invalid bearer token, square/go-jose: error in cryptographic primitive")
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError):
            return denied("invalid bearer token, token is malformed")
        if claims.get("exp", 0) < time.time():
            return denied("invalid bearer token, service account token has expired")
        matched = [a for a in wanted if a in (claims.get("aud") or [])]
        if not matched:
            return denied("invalid bearer token, token audiences " + json.dumps(claims.get("aud")) +
                          " is invalid for the target audiences " + json.dumps(wanted))
        k8s = claims.get("kubernetes.io") or {}
        namespace, sa = k8s.get("namespace"), (k8s.get("serviceaccount") or {}).get("name")
        extra: dict[str, list[str]] = {}
        bound = k8s.get("pod")
        if bound:
            pod = self._pod(namespace, bound["name"])
            if pod is None or pod["metadata"].get("uid") != bound["uid"]:
                return denied(f"invalid bearer token, pod \"{bound['name']}\" not found or deleted")
            extra["authentication.kubernetes.io/pod-name"] = [bound["name"]]
            extra["authentication.kubernetes.io/pod-uid"] = [bound["uid"]]
            if k8s.get("node"):
                extra["authentication.kubernetes.io/node-name"] = [k8s["node"]["name"]]
        extra["authentication.kubernetes.io/credential-id"] = [f"JTI={claims.get('jti')}"]
        return {"authenticated": True, "audiences": matched,
                "user": {"username": f"system:serviceaccount:{namespace}:{sa}", "uid": "",
                         "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                    "system:authenticated"], "extra": extra}}
