"""The kubelet's volume set-up for one pod, on this machine's filesystem: each volume becomes a host folder
the sandbox bind-mounts at the containers' ``mountPath``s.

- ``emptyDir`` (also ``medium: Memory``): a fresh folder per pod under ``<root>/pods/<uid>/volumes``, 0777;
- ``configMap`` / ``secret`` / ``downwardAPI`` / ``projected`` (configMap, secret, downwardAPI and
  serviceAccountToken sources; a token is the API server's answer to the kubelet's TokenRequest, bound to
  the pod, verifiable by TokenReview: testcluster/tokens.py): keys (or ``items``) written as files with ``defaultMode``/``mode``, mounted
  read-only; a missing object or key that is not ``optional`` fails the mount (``MountError``: the pod waits
  in ContainerCreating, as on a real node);
- ``persistentVolumeClaim``: the persistent folder ``<root>/pvcs/<namespace>/<claimName>`` (created when
  missing: tests pre-populate it), ``readOnly`` honoured;
- ``hostPath``: the host path itself (``type`` checks for Directory/File, and the *OrCreate kinds);
- ``fsGroup``: the kubelet's SetVolumeOwnership on writable volumes (emptyDir, PVC): group fsGroup,
  group read/write, setgid folders (``fsGroupChangePolicy: OnRootMismatch`` only when the root differs);
  files of configMap/secret volumes get group fsGroup;
- ``subPath`` / ``subPathExpr`` (expanded with the container env): a folder inside the volume (created).
- the service account token: when ``automountServiceAccountToken`` is not false and no volume is mounted
  at /var/run/secrets/kubernetes.io/serviceaccount, a stand-in for the ServiceAccount admission plugin's
  projected volume: ``token`` (an unsigned JWT, ``alg: none``, with the pod-bound claims a real token
  carries: NOT a verifiable token; a projected ``serviceAccountToken`` source gets a real one), ``namespace``, ``ca.crt`` (a placeholder: the API server is plain HTTP).

Not emulated: live updates of configMap/secret volumes (files are written once per pod), the ..data
symlink layout, sizeLimit and memory accounting of emptyDir (Memory is a folder on disk), CSI, ephemeral
volumes, image volumes, PV access modes (ReadWriteOnce is not enforced), mount propagation.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .podspec import ConfigError, Lookup, expand, field_value, resource_value, token_key

SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


class MountError(Exception):
    """MountVolume.SetUp failed (the pod stays ContainerCreating and is retried)."""


@dataclass
class Volume:
    name: str
    path: Path
    read_only: bool = False


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def service_account_token(pod: dict, *, audience: str = "https://kubernetes.default.svc.cluster.local",
                          expiration: int = 3607) -> str:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    sa = spec.get("serviceAccountName") or "default"
    iat = int(time.time())
    claims = {"aud": [audience], "exp": iat + expiration, "iat": iat, "nbf": iat,
              "iss": "https://kubernetes.default.svc.cluster.local",
              "sub": f"system:serviceaccount:{meta.get('namespace')}:{sa}",
              "kubernetes.io": {"namespace": meta.get("namespace"),
                                "node": {"name": spec.get("nodeName")},
                                "pod": {"name": meta.get("name"), "uid": meta.get("uid")},
                                "serviceaccount": {"name": sa}}}
    return f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}))}.{_b64(json.dumps(claims))}."


def _write(folder: Path, rel: str, data: bytes, mode: int, gid: int | None) -> None:
    target = folder / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    os.chmod(target, mode)
    if gid is not None:
        os.chown(target, 0, gid)


def _object_data(obj: dict, plural: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if plural == "secrets":
        for k, v in (obj.get("data") or {}).items():
            out[k] = base64.b64decode(v)
    else:
        for k, v in (obj.get("data") or {}).items():
            out[k] = str(v).encode()
        for k, v in (obj.get("binaryData") or {}).items():
            out[k] = base64.b64decode(v)
    return out


def _project_keys(folder: Path, source: dict, plural: str, obj_name: str, lookup: Lookup, namespace: str,
                  default_mode: int, gid: int | None, volume: str) -> None:
    obj = lookup(plural, obj_name)
    kind = "configmap" if plural == "configmaps" else "secret"
    if obj is None:
        if source.get("optional"):
            return
        raise MountError(f'MountVolume.SetUp failed for volume "{volume}" : {kind} "{obj_name}" not found')
    data = _object_data(obj, plural)
    items = source.get("items")
    if items is None:
        for key, value in data.items():
            _write(folder, key, value, default_mode, gid)
        return
    for item in items:
        key = item.get("key", "")
        if key not in data:
            if source.get("optional"):
                continue
            raise MountError(f'MountVolume.SetUp failed for volume "{volume}" : configmap references non-existent '
                             f'config key: {key}' if plural == "configmaps" else
                             f'MountVolume.SetUp failed for volume "{volume}" : references non-existent secret key: '
                             f'{key}')
        _write(folder, item.get("path", key), data[key], item.get("mode", default_mode), gid)


def _downward(folder: Path, items: list[dict], pod: dict, default_mode: int, gid: int | None) -> None:
    containers = {c.get("name"): c for c in (pod.get("spec") or {}).get("containers") or []}
    for item in items or []:
        if "fieldRef" in item:
            path = item["fieldRef"].get("fieldPath", "")
            meta = pod.get("metadata") or {}
            if path in ("metadata.labels", "metadata.annotations"):
                values = meta.get(path.split(".")[1]) or {}
                text = "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
            else:
                try:
                    text = field_value(pod, path)
                except ConfigError as err:
                    raise MountError(str(err)) from None
        else:
            ref = item.get("resourceFieldRef") or {}
            text = resource_value(containers.get(ref.get("containerName"), {}), ref, {})
        _write(folder, item.get("path", ""), text.encode(), item.get("mode", default_mode), gid)


def set_ownership(path: Path, gid: int, policy: str | None) -> None:
    """SetVolumeOwnership: group ``gid``, rw for the group, setgid on folders."""
    if policy == "OnRootMismatch" and os.stat(path).st_gid == gid:
        return
    for root, dirs, files in os.walk(path):
        for name in [None, *files]:
            p = root if name is None else os.path.join(root, name)
            if os.path.islink(p):
                continue
            os.chown(p, -1, gid)
            mode = os.stat(p).st_mode
            extra = 0o060 | (0o2010 if name is None else 0)
            os.chmod(p, (mode & 0o7777) | extra)


class PodVolumes:
    """Sets up a pod's volumes under ``pod_dir`` (and ``pvc_root`` for claims)."""

    def __init__(self, pod: dict, pod_dir: Path, pvc_root: Path):
        self.pod = pod
        self.dir = pod_dir / "volumes"
        self.pvc_root = pvc_root
        self.volumes: dict[str, Volume] = {}

    @property
    def _namespace(self) -> str:
        return (self.pod.get("metadata") or {}).get("namespace", "")

    def setup(self, lookup: Lookup) -> None:
        spec = self.pod.get("spec") or {}
        psc = spec.get("securityContext") or {}
        fs_group = psc.get("fsGroup")
        fs_policy = psc.get("fsGroupChangePolicy")
        for vol in spec.get("volumes") or []:
            name = vol.get("name", "")
            if name in self.volumes:
                continue
            self.volumes[name] = self._one(vol, name, lookup, fs_group, fs_policy)
        if self.wants_token() and "kube-api-access-testcluster" not in self.volumes:
            folder = self.dir / "kubernetes.io~projected" / "kube-api-access-testcluster"
            folder.mkdir(parents=True, exist_ok=True)
            _write(folder, "token", service_account_token(self.pod).encode(), 0o644, fs_group)
            _write(folder, "namespace", self._namespace.encode(), 0o644, fs_group)
            _write(folder, "ca.crt", b"", 0o644, fs_group)
            self.volumes["kube-api-access-testcluster"] = Volume("kube-api-access-testcluster", folder, True)

    def wants_token(self) -> bool:
        spec = self.pod.get("spec") or {}
        if spec.get("automountServiceAccountToken") is False:
            return False
        mounted = {m.get("mountPath", "").rstrip("/") for c in [*(spec.get("containers") or []),
                                                               *(spec.get("initContainers") or [])]
                   for m in c.get("volumeMounts") or []}
        return SA_PATH not in mounted

    def _one(self, vol: dict, name: str, lookup: Lookup, fs_group, fs_policy) -> Volume:
        if "emptyDir" in vol:
            folder = self.dir / "kubernetes.io~empty-dir" / name
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o777)
            if fs_group is not None:
                set_ownership(folder, fs_group, None)
            return Volume(name, folder)
        if "persistentVolumeClaim" in vol:
            src = vol["persistentVolumeClaim"]
            folder = self.pvc_root / self._namespace / src.get("claimName", "")
            if not folder.exists():
                folder.mkdir(parents=True)
                os.chmod(folder, 0o777)  # a dynamically provisioned local volume
            if fs_group is not None and not src.get("readOnly"):
                set_ownership(folder, fs_group, fs_policy)
            return Volume(name, folder, bool(src.get("readOnly")))
        if "hostPath" in vol:
            src = vol["hostPath"]
            path, kind = Path(src.get("path", "")), src.get("type") or ""
            if kind == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate" and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            elif kind == "Directory" and not path.is_dir():
                raise MountError(f'MountVolume.SetUp failed for volume "{name}" : hostPath type check failed: '
                                 f'{path} is not a directory')
            elif kind == "File" and not path.is_file():
                raise MountError(f'MountVolume.SetUp failed for volume "{name}" : hostPath type check failed: '
                                 f'{path} is not a file')
            return Volume(name, path)
        for plugin, key in (("configMap", "configmaps"), ("secret", "secrets")):
            if plugin in vol:
                src = vol[plugin]
                folder = self._fresh(f"kubernetes.io~{plugin.lower()}", name)
                obj_name = src.get("name", "") if plugin == "configMap" else src.get("secretName", "")
                _project_keys(folder, src, key, obj_name, lookup, self._namespace, src.get("defaultMode", 0o644),
                              fs_group, name)
                return Volume(name, folder, True)
        if "downwardAPI" in vol:
            src = vol["downwardAPI"]
            folder = self._fresh("kubernetes.io~downward-api", name)
            _downward(folder, src.get("items"), self.pod, src.get("defaultMode", 0o644), fs_group)
            return Volume(name, folder, True)
        if "projected" in vol:
            src = vol["projected"]
            folder = self._fresh("kubernetes.io~projected", name)
            mode = src.get("defaultMode", 0o644)
            for source in src.get("sources") or []:
                if "configMap" in source:
                    _project_keys(folder, source["configMap"], "configmaps", source["configMap"].get("name", ""),
                                  lookup, self._namespace, mode, fs_group, name)
                elif "secret" in source:
                    _project_keys(folder, source["secret"], "secrets", source["secret"].get("name", ""),
                                  lookup, self._namespace, mode, fs_group, name)
                elif "downwardAPI" in source:
                    _downward(folder, source["downwardAPI"].get("items"), self.pod, mode, fs_group)
                elif "serviceAccountToken" in source:  # the server's answer to the kubelet's TokenRequest
                    tok = source["serviceAccountToken"]
                    answer = lookup("serviceaccounttokens", token_key(tok))
                    if answer is None:
                        raise MountError(f'MountVolume.SetUp failed for volume "{name}" : failed to fetch token')
                    _write(folder, tok.get("path", "token"), answer["status"]["token"].encode(), mode, fs_group)
            return Volume(name, folder, True)
        raise MountError(f'MountVolume.SetUp failed for volume "{name}" : volume type not supported by the test '
                         f'cluster: {sorted(k for k in vol if k != "name")}')

    def _fresh(self, plugin: str, name: str) -> Path:
        folder = self.dir / plugin / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.chmod(folder, 0o755)
        return folder

    def mounts(self, container: dict, env: dict[str, str]) -> list[tuple[str, str, bool]]:
        """(host path, mountPath, read-only) for one container's volumeMounts (+ the token)."""
        out = []
        for m in container.get("volumeMounts") or []:
            vol = self.volumes.get(m.get("name", ""))
            if vol is None:
                raise ConfigError(f'cannot find volume "{m.get("name")}" to mount into container '
                                  f'"{container.get("name")}"')
            source = vol.path
            sub = m.get("subPath") or (expand(m["subPathExpr"], env) if m.get("subPathExpr") else "")
            if sub:
                if os.path.isabs(sub) or ".." in Path(sub).parts:
                    raise ConfigError(f"failed to prepare subPath for volumeMount \"{m.get('name')}\" of container "
                                      f"\"{container.get('name')}\"")
                source = vol.path / sub
                if not source.exists():
                    source.mkdir(parents=True)  # the kubelet creates a missing subPath folder
                    os.chmod(source, 0o777 if not vol.read_only else 0o755)
            out.append((str(source), m.get("mountPath", ""), bool(m.get("readOnly")) or vol.read_only))
        token = self.volumes.get("kube-api-access-testcluster")
        if token is not None:
            out.append((str(token.path), SA_PATH, True))
        return out
