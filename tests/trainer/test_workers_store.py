"""A worker's committed batches (trainer/workers.py ShardStore) after a writer was killed mid-commit."""
from __future__ import annotations

from branchmerge.trainer.workers import ShardStore


def test_a_torn_commit_is_dropped_by_the_writer_and_skipped_by_readers(tmp_path):
    store = ShardStore(tmp_path / "w")
    store.commit(["p1"], [{"id": "p1", "text": "a"}], {"n": 1})
    store.commit(["p2"], [{"id": "p2", "text": "b"}], {"n": 1})
    good = store.commits_path.read_bytes()
    samples = store.samples_path.read_bytes()
    # killed while writing a third batch: half a samples line and half a commit line
    with open(store.samples_path, "ab") as f:
        f.write(b'{"id": "p3", "te')
    with open(store.commits_path, "ab") as f:
        f.write(b'{"ids": ["p3"], "end"')

    reader = ShardStore(tmp_path / "w", writer=False)
    assert reader.done_prompts == {"p1", "p2"}
    assert store.commits_path.read_bytes() != good  # a reader leaves the files as they are

    writer = ShardStore(tmp_path / "w")
    assert writer.done_prompts == {"p1", "p2"}
    assert writer.commits_path.read_bytes() == good and writer.samples_path.read_bytes() == samples
    assert [r["id"] for r in writer.read_samples()] == ["p1", "p2"]


def test_worker_settings_from_the_environment_are_checked(monkeypatch):
    import pytest

    from branchmerge.trainer.errors import InvalidInput
    from branchmerge.trainer.eval.work import CHUNK_ENV, DEFAULT_CHUNK, chunk_size
    from branchmerge.trainer.workers import WAIT_ENV, env_seconds

    monkeypatch.delenv(CHUNK_ENV, raising=False)
    assert chunk_size() == DEFAULT_CHUNK
    monkeypatch.setenv(CHUNK_ENV, "64")
    assert chunk_size() == 64
    for bad, message in (("1.5", "not a whole number of requests"), ("0", "must be >= 1")):
        monkeypatch.setenv(CHUNK_ENV, bad)
        with pytest.raises(InvalidInput, match=message):
            chunk_size()
    monkeypatch.setenv(WAIT_ENV, "2.5")
    assert env_seconds(WAIT_ENV, 7200) == 2.5
    monkeypatch.setenv(WAIT_ENV, "-1")
    with pytest.raises(InvalidInput, match=r"\$BRANCHMERGE_SHARD_WAIT_SECONDS: must be >= 0"):
        env_seconds(WAIT_ENV, 7200)
