"""Stage one hf:// input into a folder, once, however many pods ask at the same time.

``python -m branchmerge.trainer.staging REPO REVISION DEST [--repo-type TYPE] [--subpath PATH]
[--allow-pattern P ...]``: the command of the operator's ``stage-input-N`` init containers, from the input's URI
``hf://[datasets/|spaces/]org/name[@revision][/subpath]`` (api/uris.py parses it for both sides) and the
ref's ``allowPatterns`` (which name a copy of their own: api/uris.py ``staged_name``).
With a staging PVC shared by the pods of a gang and by concurrent CRs, many of them stage the same input
into the same ``DEST`` at once. Rules:

- ``DEST`` only ever appears whole: each downloader writes into a folder of its own
  (``DEST.partial-<host>-<random>``) and renames it into place (atomic within one filesystem);
- one download at a time per input: the downloader holds ``DEST.lock``, a directory (``mkdir`` is atomic
  on local filesystems and on NFS, where ``flock`` is not always honoured) whose mtime it refreshes
  every ``HEARTBEAT`` seconds; the others wait until ``DEST`` exists;
- a lock without a heartbeat for ``STALE`` seconds belongs to a dead pod: the next waiter takes it over
  (two waiters breaking it at once may download twice; both still publish atomically, one rename wins);
- leftovers of dead downloaders (``DEST.partial-*`` older than ``STALE``) are removed by the next holder.

The downloader resolves the revision to a commit first and downloads that commit (a branch that moves
during the download cannot mix two commits), only the subpath's files when the URI names one and only those
matching ``allowPatterns`` when the ref has them; the commit is recorded in ``DEST/.branchmerge-source.json``,
which the stage copies into its output manifest.

Exit codes as the stages': 0 staged, 2 permanent (the repository, revision or subpath does not exist, no
file matches the patterns, or it is gated or private and the token is missing or not granted: HTTP 401/403/404), 3 anything else (retried).
The reason goes to ``$BRANCHMERGE_TERMINATION_LOG`` (the init container's termination message, which the
operator puts in the CR's condition) as one line, the token never in it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..api.timefmt import format_time
from ..api.uris import HF_TYPES, HfUri, hf_inputs, staged_name, staging_root

STALE = float(os.environ.get("BRANCHMERGE_STAGING_STALE_SECONDS", "120"))
HEARTBEAT = float(os.environ.get("BRANCHMERGE_STAGING_HEARTBEAT_SECONDS", "15"))
POLL = float(os.environ.get("BRANCHMERGE_STAGING_POLL_SECONDS", "2"))


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        try:
            os.utime(lock)
        except OSError:
            return


def _remove_leftovers(dest: Path) -> None:
    for old in dest.parent.glob(dest.name + ".partial-*"):
        age = _age(old)
        if age is not None and age > STALE:
            shutil.rmtree(old, ignore_errors=True)


def stage(download, dest: Path) -> bool:
    """Make ``dest`` exist, calling ``download(tmp_dir)`` at most once here; True if this call downloaded."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.with_name(dest.name + ".lock")
    me = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    while not dest.is_dir():
        try:
            lock.mkdir()
        except FileExistsError:
            age = _age(lock)
            if age is not None and age > STALE:  # its holder stopped beating: take it over
                stale = lock.with_name(f"{lock.name}.stale-{me}")
                try:
                    lock.rename(stale)  # one waiter wins the rename; the others see it gone
                    shutil.rmtree(stale, ignore_errors=True)
                except OSError:
                    pass
                continue
            time.sleep(POLL)
            continue
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
        beat.start()
        tmp = dest.with_name(f"{dest.name}.partial-{me}")
        try:
            if dest.is_dir():  # published while this one waited for the lock
                return False
            _remove_leftovers(dest)
            download(tmp)
            try:
                tmp.rename(dest)
            except OSError:
                if not dest.is_dir():
                    raise
            return True
        finally:
            stop.set()
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(lock, ignore_errors=True)
    return False


SOURCE_FILE = ".branchmerge-source.json"  # hidden: readers of a staged folder skip dot files
MESSAGE_LIMIT = 300  # the operator keeps the last 300 characters of an init container's message
# huggingface_hub's errors that no retry can fix (class names: the hub client is imported only to download)
PERMANENT_ERRORS = {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "DisabledRepoError",
                    "RemoteEntryNotFoundError", "EntryNotFoundError", "HFValidationError", "SubpathNotFound",
                    "NothingMatched"}


class SubpathNotFound(Exception):
    """The URI's subpath names no file or folder at the resolved commit."""


class NothingMatched(Exception):
    """No file of the repository (under the subpath) matches the ref's allowPatterns at the resolved commit."""


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != SOURCE_FILE]


def download_commit(hf: HfUri, tmp: Path, patterns: Sequence[str] = ()) -> dict:
    """Resolve the revision to a commit, download that commit's files (the subpath's only, those matching
    ``patterns`` only) into ``tmp`` and return the source record written beside them."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().repo_info(hf.repo_id, repo_type=hf.repo_type, revision=hf.revision)
    tmp.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo_id=hf.repo_id, repo_type=hf.repo_type, revision=info.sha, local_dir=str(tmp),
                      allow_patterns=hf.allow_patterns(patterns))
    shutil.rmtree(tmp / ".cache" / "huggingface", ignore_errors=True)  # the client's resume state, not the repo's
    with contextlib.suppress(OSError):
        (tmp / ".cache").rmdir()  # unless the repository has a .cache of its own
    # snapshot_download only warns when nothing matched; a typo would otherwise stage an empty folder
    if patterns and not _files(tmp):
        where = f" under {hf.subpath!r}" if hf.subpath else ""
        raise NothingMatched(f"no file{where} in {hf.repo_id} at commit {info.sha} matches allowPatterns "
                             f"{list(patterns)}")
    if hf.subpath and not (tmp / hf.subpath).exists():
        raise SubpathNotFound(f"no file or folder {hf.subpath!r} in {hf.repo_id} at commit {info.sha}")
    record = {"uri": hf.uri(), "repoType": hf.repo_type, "repo": hf.repo_id, "revision": hf.revision,
              "subpath": hf.subpath, **({"allowPatterns": list(patterns)} if patterns else {}),
              "commit": info.sha, "stagedAt": format_time()}
    (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_source(dest: Path) -> dict | None:
    """The source record of a staged folder (None: staged before records were kept, or not staged)."""
    try:
        return json.loads((dest / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def staged_sources(spec) -> list[dict]:
    """The staged hf:// inputs of a resolved spec (a dict) with their recorded commits, in spec order."""
    sources = []
    for uri, patterns in hf_inputs(spec):
        record = read_source(staging_root() / staged_name(uri, patterns)) or {}
        sources.append({"uri": uri, **({"allowPatterns": list(patterns)} if patterns else {}),
                        "commit": record.get("commit"),
                        **{k: record[k] for k in ("repoType", "repo", "revision") if k in record}})
    return sources


def _http_status(err: BaseException) -> int | None:
    """The hub's HTTP status behind an error: its own, or its explicit cause's (huggingface_hub raises some as
    LocalEntryNotFoundError ``from`` the HTTP error; an error merely raised while handling another is not it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        status = getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        err = err.__cause__
    return None


def is_permanent(err: BaseException) -> bool:
    return type(err).__name__ in PERMANENT_ERRORS or _http_status(err) in (401, 403, 404)


def _scrub(text: str) -> str:
    """Never a token in a message (huggingface_hub does not print it; this holds if that changes)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        token = os.environ.get(name)
        if token:
            text = text.replace(token, "***")
    return text


HINTS = {401: "a private or gated repository needs a token: the branchmerge.dev/hf-token-secret annotation "
                "or the operator's trainer.hfTokenSecret",
         403: "the token's account has not been granted access to this repository"}


def failure_reason(hf: HfUri, err: BaseException) -> str:
    """One line for the CR's condition: the input, the HTTP status and the hub's own words (then a hint)."""
    status = _http_status(err)
    detail = getattr(err, "server_message", None) or str(err)  # the Hub's X-Error-Message when it sent one
    line = f"staging {hf.uri()} failed: {f'HTTP {status} ' if status else ''}{type(err).__name__}: {detail}"
    if status in HINTS:
        line += f" ({HINTS[status]})"
    return _scrub(" ".join(line.split()))[:MESSAGE_LIMIT]


def _write_termination_log(text: str) -> None:
    path = os.environ.get("BRANCHMERGE_TERMINATION_LOG")
    if path:
        try:
            Path(path).write_text(text)
        except OSError:
            pass


def parse_args(argv: list[str]) -> tuple[HfUri, Path, tuple[str, ...]]:
    p = argparse.ArgumentParser(prog="python -m branchmerge.trainer.staging")
    p.add_argument("repo", help="org/name")
    p.add_argument("revision", help="branch, tag or commit; empty: the default branch")
    p.add_argument("dest", type=Path)
    p.add_argument("--repo-type", choices=sorted(HF_TYPES.values()), default="model")
    p.add_argument("--subpath", default="", help="stage only this file or folder of the repository")
    p.add_argument("--allow-pattern", action="append", default=[], dest="patterns", metavar="PATTERN",
                   help="stage only the files matching one of these (relative to the subpath; repeatable)")
    args = p.parse_args(argv)
    hf = HfUri(args.repo_type, args.repo, args.revision or None, args.subpath.strip("/"))
    return hf, args.dest, tuple(args.patterns)


def main(argv: list[str]) -> int:
    hf, dest, patterns = parse_args(argv)
    try:
        did = stage(lambda tmp: download_commit(hf, tmp, patterns), dest)
    except Exception as err:  # noqa: BLE001 -- classified for the operator below
        reason = failure_reason(hf, err)
        print(_scrub(f"{reason}\n{type(err).__name__}: {err}"), file=sys.stderr)  # the full text in the log
        _write_termination_log(reason)
        return 2 if is_permanent(err) else 3
    commit = (read_source(dest) or {}).get("commit") or "unknown (staged before commits were recorded)"
    print(f"{'staged' if did else 'already staged'}: {hf.uri()} at commit {commit} -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
