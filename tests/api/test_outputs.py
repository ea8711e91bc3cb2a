"""The published-output contract (api/outputs.py): the manifest a stage writes (trainer/publish.py) read back, and
the one "published intact" judgement the local runner, its cache and the SFT tests share."""
from __future__ import annotations

import signal

from branchmerge.api.outputs import (MANIFEST, attempt_succeeded, combined_digest, folder_digests,
                                     published_intact, read_manifest)
from branchmerge.trainer.publish import atomic_folder


def _publish(dest, files: dict[str, bytes]) -> str:
    with atomic_folder(dest) as folder:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    return combined_digest(read_manifest(dest))


def test_the_manifest_lists_every_file_but_the_card_and_matches_a_rehash(tmp_path):
    out = tmp_path / "out"
    digest = _publish(out, {"model.safetensors": b"weights", "sub/config.json": b"{}", "README.md": b"# card"})
    files = read_manifest(out)
    assert set(files) == {"model.safetensors", "sub/config.json"}  # the card is about the output, not in it
    assert files == folder_digests(out)
    assert digest == combined_digest(folder_digests(out)) and digest.startswith("sha256:")
    assert read_manifest(tmp_path / "missing") is None


def test_published_intact_needs_the_same_manifest_digest(tmp_path):
    out = tmp_path / "out"
    digest = _publish(out, {"a.bin": b"1"})
    assert published_intact(out.as_uri(), digest)
    assert not published_intact(out.as_uri(), "sha256:" + "0" * 64)  # republished since: not the recorded output
    assert not published_intact(None, digest) and not published_intact(out.as_uri(), None)
    assert not published_intact("pvc://claim/out", digest)  # not reachable from this machine
    assert not published_intact((tmp_path / "nothing").as_uri(), digest)
    (out / MANIFEST).unlink()  # half-removed by hand: no longer a publication
    assert not published_intact(out.as_uri(), digest)


def test_an_attempt_succeeds_by_its_result_and_exit_or_by_its_intact_output(tmp_path):
    out = tmp_path / "out"
    digest = _publish(out, {"model.safetensors": b"weights"})
    assert attempt_succeeded(0, {"phase": "Succeeded"})
    assert not attempt_succeeded(-signal.SIGABRT, {"phase": "Succeeded"})  # an abort needs the output to vouch
    published = {"phase": "Succeeded", "outputUri": out.as_uri(), "digest": digest}
    assert attempt_succeeded(-signal.SIGABRT, published) and attempt_succeeded(1, published)  # abort at exit
    assert not attempt_succeeded(1, {**published, "digest": "sha256:other"})
    assert not attempt_succeeded(0, {**published, "phase": "Failed"}) and not attempt_succeeded(2, {})
