"""A local stand-in for the Hugging Face Hub's HTTP API: what ``huggingface_hub`` (2.x, httpx) calls to stage a
repository (``HfApi.repo_info``, then ``snapshot_download`` of a commit), served from memory on 127.0.0.1.
Point a process at it with ``HF_ENDPOINT`` (``HubStandIn.env()``).

Emulated, as the Hub answers (paths for models, ``datasets/`` and ``spaces/``):

- ``GET /api/{models|datasets|spaces}/{org}/{name}[/revision/{rev}]``: the repository info (``id``, ``sha`` of
  the revision's commit, ``siblings``); a revision is a branch/tag/PR ref of ``Repo.refs`` or a full commit sha;
- ``GET /api/{type}s/{org}/{name}/tree/{rev}[/{path}]?recursive=``: files and folders under a path;
- ``HEAD``/``GET /[datasets/|spaces/]{org}/{name}/resolve/{rev}/{path}``: a file's metadata (``X-Repo-Commit``,
  ``ETag``, ``Content-Length``) and bytes;
- errors with the Hub's ``X-Error-Code``/``X-Error-Message`` headers and a JSON ``{"error": ...}`` body: a
  missing repository is 401 ``RepoNotFound`` without a token, 404 with one (the Hub does not tell strangers
  which private repositories exist); a private one without its token is the same 401; a missing revision
  404 ``RevisionNotFound``; a missing file 404 ``EntryNotFound``; a gated repository 401 ``GatedRepo``
  without a token, 403 ``GatedRepo`` with a token that was not granted; ``Repo.fail_status`` answers every
  request about a repository with that status (500: the Hub is down).

Not emulated: LFS/Xet storage and the CDN redirects of large files (every file is served from here, its ETag
the sha256 as for LFS files), tree pagination (one page), Range requests and resumed downloads, rate limits
(429), commit history (every ref and commit shows the same files; commits other than the refs' are
unknown), ``expand``/``blobs`` parameters, uploads, and accounts beyond one bearer token per private or gated
repository.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass
class Repo:
    files: dict[str, bytes]
    refs: dict[str, str] = field(default_factory=dict)  # extra refs (tags, refs/pr/N) -> commit; main is added
    token: str | None = None  # private or gated: the bearer token that may read it
    gated: bool = False  # with token: gated (GatedRepo errors) rather than private (RepoNotFound)
    fail_status: int | None = None
    slow: dict[str, float] = field(default_factory=dict)  # file -> seconds before its bytes are sent

    @property
    def commit(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name])
        return h.hexdigest()

    def resolve(self, revision: str | None) -> str | None:
        refs = {"main": self.commit, **self.refs}
        if revision is None:
            return refs["main"]
        if revision in refs:
            return refs[revision]
        return revision if revision in refs.values() else None


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self._lock = threading.Lock()
        self._closing = threading.Event()  # releases slow downloads at exit
        self._server: ThreadingHTTPServer | None = None

    def add(self, repo_type: str, repo_id: str, files: dict[str, bytes], **kw) -> Repo:
        repo = self.repos[(repo_type, repo_id)] = Repo(dict(files), **kw)
        return repo

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Environment of a process that should talk to this hub and nothing else."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1"}

    def downloads(self, path_suffix: str = "") -> list[str]:
        """Paths of the file bytes served (GET .../resolve/...)."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p and p.endswith(path_suffix)]

    def __enter__(self) -> "HubStandIn":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    # ---- routing ----

    def _serve(self, body: bool) -> None:
        url = urlsplit(self.path)
        self.hub.record(self.command, url.path)
        # split the raw path first: an encoded '/' (refs%2Fpr%2F1) stays inside its segment
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in TYPES:
                self._api(TYPES[parts[1]], parts[2:], url.query, body)
            elif "resolve" in parts:
                self._resolve(parts, body)
            else:
                raise _HubError(404, "Sorry, we can't find the page you are looking for.")
        except _HubError as err:
            self._error(err, body)

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or None
        if repo is not None and repo.fail_status:
            raise _HubError(repo.fail_status, "Internal Error - We're working hard to fix this as soon as "
                                              "possible!")
        if repo is None or (repo.token and not repo.gated and token != repo.token):
            # unknown and private look the same; without a token the Hub answers 401
            raise _HubError(404 if token else 401, "Repository not found", "RepoNotFound")
        if repo.gated and token != repo.token:
            if token is None:
                raise _HubError(401, f"Access to {repo_type} {repo_id} is restricted. You must have access to it "
                                     "and be authenticated to access it. Please log in.", "GatedRepo")
            raise _HubError(403, f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized "
                                 f"list. Visit {self.hub.url}/{URL_PREFIX[repo_type]}{repo_id} to ask for access.",
                            "GatedRepo")
        return repo

    def _commit(self, repo: Repo, revision: str | None) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _api(self, repo_type: str, rest: list[str], query: str, body: bool) -> None:
        repo_id = "/".join(rest[:2])
        repo = self._repo(repo_type, repo_id)
        tail = rest[2:]
        if not tail or tail[0] == "revision":
            commit = self._commit(repo, tail[1] if len(tail) > 1 else None)
            info = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "sha": commit,
                    "private": bool(repo.token and not repo.gated), "gated": "auto" if repo.gated else False,
                    "disabled": False, "lastModified": "2025-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
            return self._json(200, info, body)
        if tail[0] == "tree" and len(tail) >= 2:
            self._commit(repo, tail[1])
            return self._json(200, self._tree(repo, "/".join(tail[2:]), "recursive=true" in query.lower()), body)
        raise _HubError(404, "Sorry, we can't find the page you are looking for.")

    def _tree(self, repo: Repo, path: str, recursive: bool) -> list[dict]:
        prefix = f"{path}/" if path else ""
        below = [name for name in sorted(repo.files) if name.startswith(prefix)]
        if path and not below:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for name in below:
            rel = name[len(prefix):].split("/")
            for depth in range(1, len(rel)):  # the folders on the way
                folder = prefix + "/".join(rel[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": _git_oid(folder.encode()), "size": 0,
                                                "path": folder})
            if recursive or len(rel) == 1:
                data = repo.files[name]
                entries[name] = {"type": "file", "oid": _git_oid(data), "size": len(data), "path": name}
        return list(entries.values())

    def _resolve(self, parts: list[str], body: bool) -> None:
        at = parts.index("resolve")
        head = parts[:at]
        repo_type = TYPES.get(head[0], "model") if len(head) == 3 else "model"
        repo_id = "/".join(head[-2:])
        repo = self._repo(repo_type, repo_id)
        if len(parts) < at + 3:
            raise _HubError(404, "Entry not found", "EntryNotFound")
        commit = self._commit(repo, parts[at + 1])
        name = "/".join(parts[at + 2:])
        if name not in repo.files:
            raise _HubError(404, "Entry not found", "EntryNotFound")
        data = repo.files[name]
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            if repo.slow.get(name):
                self.hub._closing.wait(repo.slow[name])  # a large file: the client waits for it
            try:
                self.wfile.write(data)
            except OSError:  # the client was killed meanwhile
                pass

    # ---- responses ----

    def _json(self, status: int, value, body: bool, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        for key, val in (headers or {}).items():
            self.send_header(key, val)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, err: _HubError, body: bool) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, body, headers)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
