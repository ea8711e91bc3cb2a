"""Tokenise the training data once per run: a cache of the samples beside the checkpoints.

Without it every rank of every attempt (32 ranks, and again in each retried pod) reads and tokenises the whole
dataset before training. With it, global rank 0 builds the samples once and writes them to
``<checkpoint root>/tokens/<key>/`` (``checkpoint.checkpoint_root``: spec.checkpointing.uri, else beside the
output; a volume every rank sees); the other ranks and later attempts load them. Removed when the run
publishes its output, like the checkpoints.

The key is a digest of everything the samples depend on: the content of the data files (published folders:
the digests of their ``_manifest.json``, outputs are immutable), the tokenizer's files (every small file of
the base folder: config.json decides how transformers rebuilds a Qwen2 tokenizer), the training template,
spec.data, maxSeqLen, overLength, the mixing seed, trust_remote_code, the source of the tokenising modules and
the versions of transformers and tokenizers. Content digests, not mtimes: staged inputs are downloaded
again by every pod. Packing, batch sizes and learning rates are not in it (a rerun with new ones hits).

Files: ``tokens.safetensors`` (input ids int32, trained-position mask uint8, per-sample offsets, and the
order of the mixed samples into the unique ones: a dataset repeated by its weight is stored once) and
``manifest.json`` (key, sizes, sha256 of the tokens file, the data stats), written into a temp folder and
renamed into place. A folder whose manifest, size, digest or structure does not check out is ignored and
rebuilt. Ranks other than 0 poll for the folder while rank 0 builds it; if rank 0 finds the data invalid it
leaves ``<key>.invalid`` so they stop waiting and fail the same way; after ``WAIT_SECONDS`` they tokenise
themselves (the behaviour without a cache).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ...api.outputs import read_manifest, sha256_file, write_json_atomic
from ..datasets import dataset_files
from ..errors import InvalidInput
from . import checkpoint as ckpt
from .dataset import DataStats, build_samples, training_template
from .packing import IGNORE, Sample

log = logging.getLogger("branchmerge.sft")
FORMAT = 1
TOKENS, MANIFEST = "tokens.safetensors", "manifest.json"
# the modules whose code decides the samples: an edit to any of them is a new key
SOURCES = ("chat.py", "dataset.py", "records.py", "packing.py", "token_cache.py", "../datasets.py",
           "../decontamination.py")
TOKENIZER_FILE_LIMIT = 64 << 20  # larger files of the base folder are weights, not tokenizer
WAIT_SECONDS = 3 * 3600.0  # rank 0 may tokenise a large dataset for a long time
POLL_SECONDS = 2.0


def cache_root(output_dir: Path, checkpoint_uri: str | None) -> Path:
    return ckpt.checkpoint_root(output_dir, checkpoint_uri) / "tokens"


def remove(root: Path) -> None:
    """Delete the cache folder of this run (called by rank 0 once the output is published)."""
    shutil.rmtree(root, ignore_errors=True)


# ---- the key ---------------------------------------------------------------------------------------------

def _code_digest() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _data_digests(path: Path, what: str) -> dict[str, str]:
    """sha256 of each file the dataset reader reads; a published folder's own digests where it has them."""
    known = (read_manifest(path) or {}) if path.is_dir() else {}
    out = {}
    for file in dataset_files(path, what):
        name = str(file.relative_to(path)) if path.is_dir() else file.name
        out[name] = known.get(name) or sha256_file(file)
    return out


def _tokenizer_digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.stat().st_size <= TOKENIZER_FILE_LIMIT}


def cache_key(spec, template: str | None, tokenizer_dir: Path, input_path) -> str:
    import tokenizers
    import transformers

    t = spec.training
    parts = {
        "format": FORMAT,
        "code": _code_digest(),
        "libraries": [transformers.__version__, tokenizers.__version__],
        "spec": spec.model_dump(mode="json", by_alias=True, include={"data", "chat_template", "trust_remote_code"}),
        "training": [t.max_seq_len, t.over_length, t.seed],
        "template": template,
        "tokenizer": _tokenizer_digests(tokenizer_dir),
        "data": [_data_digests(input_path(ref, f"spec.data[{i}]"), f"spec.data[{i}]")
                 for i, ref in enumerate(spec.data)],
    }
    gate = getattr(spec, "decontaminate", None)
    if gate is not None:  # the gate decides which records are kept: its settings and its benchmarks' content
        parts["decontaminate"] = gate.model_dump(mode="json", by_alias=True)
        parts["benchmarks"] = [_data_digests(input_path(ref, f"spec.decontaminate.benchmarks[{i}]"),
                                             f"spec.decontaminate.benchmarks[{i}]")
                               for i, ref in enumerate(gate.benchmarks)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# ---- the files -------------------------------------------------------------------------------------------

def _unique(samples: list[Sample]) -> tuple[list[Sample], list[int]]:
    """The distinct sample objects (mixing repeats them) and the position of each sample among them."""
    index: dict[int, int] = {}
    uniques = []
    order = []
    for s in samples:
        if id(s) not in index:
            index[id(s)] = len(uniques)
            uniques.append(s)
        order.append(index[id(s)])
    return uniques, order


def _encode(samples: list[Sample]) -> dict[str, np.ndarray] | None:
    """Arrays of the samples; None when a label is neither -100 nor its input id (then not cacheable as a mask)."""
    uniques, order = _unique(samples)
    lengths = np.fromiter((len(s.input_ids) for s in uniques), dtype=np.int64, count=len(uniques))
    offsets = np.zeros(len(uniques) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(itertools.chain.from_iterable(s.input_ids for s in uniques), dtype=np.int64, count=total)
    labels = np.fromiter(itertools.chain.from_iterable(s.labels for s in uniques), dtype=np.int64, count=total)
    trained = labels != IGNORE
    if not np.array_equal(labels[trained], ids[trained]) or (total and ids.max() >= 2 ** 31):
        return None
    return {"input_ids": ids.astype(np.int32), "trained": trained.astype(np.uint8), "offsets": offsets,
            "order": np.asarray(order, dtype=np.int64)}


def _decode(arrays: dict[str, np.ndarray]) -> list[Sample]:
    ids, offsets, order = arrays["input_ids"], arrays["offsets"], arrays["order"]
    labels = np.where(arrays["trained"].astype(bool), ids, IGNORE)
    if offsets[0] != 0 or offsets[-1] != len(ids) or len(arrays["trained"]) != len(ids) \
            or np.any(np.diff(offsets) < 0) or (len(order) and (order.min() < 0 or order.max() >= len(offsets) - 1)):
        raise ValueError("inconsistent arrays")
    id_list, label_list, bounds = ids.tolist(), labels.tolist(), offsets.tolist()
    uniques = [Sample(id_list[a:b], label_list[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [uniques[i] for i in order.tolist()]


def load(folder: Path, key: str, warn: bool = True) -> tuple[list[Sample], DataStats] | None:
    """The cached samples and stats, or None when the folder is missing, partial or corrupted."""
    from safetensors.numpy import load as load_arrays

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            return None
        data = (folder / TOKENS).read_bytes()
        if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            raise ValueError(f"{TOKENS}: size or digest differs from the manifest")
        samples = _decode(load_arrays(data))
        if len(samples) != manifest["samples"]:
            raise ValueError("sample count differs from the manifest")
        return samples, DataStats(**manifest["stats"])
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 -- whatever is wrong with a cache, it is rebuilt, never fatal
        if warn:
            log.warning("token cache %s unusable (%s: %s); ignored", folder, type(err).__name__, err)
        return None


def write(root: Path, key: str, samples: list[Sample], stats: DataStats) -> Path | None:
    """Write the cache folder atomically (temp folder + rename); None if it could not be written."""
    from safetensors.numpy import save as save_arrays

    arrays = _encode(samples)
    if arrays is None:
        log.warning("token cache: labels are not a mask of the input ids; not cached")
        return None
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    dest = root / key
    try:
        tmp.mkdir(parents=True)
        data = save_arrays(arrays)
        with open(tmp / TOKENS, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        write_json_atomic(tmp / MANIFEST, {"format": FORMAT, "key": key, "samples": len(samples),
                                           "uniqueSamples": len(arrays["offsets"]) - 1,
                                           "storedTokens": int(arrays["offsets"][-1]), "bytes": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest(), "stats": asdict(stats)})
        if dest.exists():  # an unusable earlier one (load said so)
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return dest
    except OSError as err:  # a full or read-only volume costs the cache, not the run
        log.warning("token cache: cannot write %s (%s)", dest, err)
        shutil.rmtree(tmp, ignore_errors=True)
        return None


# ---- the protocol ----------------------------------------------------------------------------------------

def _invalid_marker(root: Path, key: str) -> Path:
    return root / f"{key}.invalid"


def _set_invalid(root: Path, key: str, message: str | None) -> None:
    """Leave (or clear, ``None``) rank 0's verdict on invalid data; best effort."""
    marker = _invalid_marker(root, key)
    with contextlib.suppress(OSError):
        if message is None:
            marker.unlink(missing_ok=True)
        else:
            root.mkdir(parents=True, exist_ok=True)
            marker.write_text(message)


def _wait(root: Path, key: str, wait_s: float, poll_s: float) -> tuple[list[Sample], DataStats] | None:
    """Poll for rank 0's cache; None when rank 0 reported invalid data or after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        found = load(root / key, key, warn=False)  # rank 0 may be replacing a damaged one
        if found is not None:
            return found
        if _invalid_marker(root, key).exists():
            return None
        if time.monotonic() >= deadline:
            log.warning("token cache: nothing at %s after %.0f s; tokenising on this rank", root / key, wait_s)
            return None
        time.sleep(poll_s)


def load_or_build(spec, tokenizer, tokenizer_dir: Path, input_path, root: Path, rank: int = 0,
                  world_size: int = 1, *, wait_s: float = WAIT_SECONDS, poll_s: float = POLL_SECONDS,
                  ) -> tuple[list[Sample], DataStats, str]:
    """(samples, stats, "hit" | "miss"): the samples of dataset.build_samples, from the cache when it holds
    them. Rank 0 builds and writes on a miss; other ranks wait for it. Leaves ``tokenizer`` with the base
    model's template either way (dataset.training_template)."""
    template = training_template(spec, tokenizer)
    key = cache_key(spec, template, tokenizer_dir, input_path)
    found = load(root / key, key) if rank == 0 else _wait(root, key, wait_s, poll_s)
    if found is not None:
        return found[0], found[1], "hit"
    if rank != 0:  # rank 0 failed or is too slow: tokenise here, as without a cache
        samples, stats = build_samples(spec, tokenizer, input_path)
        return samples, stats, "miss"
    _set_invalid(root, key, None)  # an earlier attempt's
    try:
        samples, stats = build_samples(spec, tokenizer, input_path)
    except InvalidInput as err:  # deterministic: the waiting ranks would fail the same way
        if world_size > 1:
            _set_invalid(root, key, str(err))
        raise
    write(root, key, samples, stats)
    return samples, stats, "miss"
