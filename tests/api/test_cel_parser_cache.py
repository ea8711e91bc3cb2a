"""The CEL parser's cache is a pickle: it may only live in a folder that no other user can write."""
from __future__ import annotations

import os
import subprocess
import sys

from branchmerge.api import validation


def test_cache_file_only_in_a_private_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = validation._private_cache_file("cel")
    folder = tmp_path / "branchmerge"
    assert path is not None and os.path.dirname(path) == str(folder)
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)  # others could plant a pickle there: no cache
    assert validation._private_cache_file("cel") is None


def test_rules_give_the_same_verdicts_with_and_without_the_cache(tmp_path):
    """A fresh process builds and saves the cache, a second loads it; both reject the same manifest."""
    script = ("from branchmerge.api.validation import parse_resource, InvalidManifest\n"
              "doc = {'apiVersion': 'branchmerge.dev/v1alpha1', 'kind': 'Merge', 'metadata': {'name': 'm'},\n"
              "       'spec': {'method': 'slerp', 'base': {'uri': 'file:///b'}, 'models': [{'uri': 'file:///a'}],\n"
              "                'output': {'uri': 'file:///o'}}}\n"
              "try:\n    parse_resource(doc)\n    print('accepted')\n"
              "except InvalidManifest as err:\n    print('rejected', err)\n")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert list(tmp_path.glob("branchmerge/cel-parser-*.pickle"))
    assert runs[0] == runs[1] and runs[0].startswith("rejected") and "slerp needs exactly 2 models" in runs[0]
