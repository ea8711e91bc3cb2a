"""Merge pre-flight: every input checked from what describes it -- safetensors headers, config.json and the
tokenizer -- before the engine reads any tensor, and the run's peak memory and output size estimated.

The headers are read (and their framing checked: length prefix, JSON, offsets inside the file, shards named
by an index) when the stage opens each folder (``ModelFolder``, ``SafetensorsFile``): nothing here maps or
reads tensor data. On top of that, this module checks, against the reference (the base, else the first
model), with the engine's own tolerances (layout.py: tied embeddings, vocabulary rows trimmed to the rows every
input has):
- the architecture: the config fields that fix what the tensors mean;
- every tensor's name and shape, all mismatches at once, each naming its input, file and tensor;
- the tokenizers: each input's vocabulary must agree, id for id, with the output's tokenizer (the base's or
  ``tokenizerSource``), which the engine copies as is; sizes may differ (the documented trim), and the
  embedding rows the output keeps must cover every token id of that tokenizer. Rows past the last token id are
  padding (Qwen2.5: 152064 rows for 151665 tokens): the output keeps them, merged like any row, unless an input
  has fewer rows, in which case every input is trimmed to that many (mergekit #425 is the same question);
- the dtypes of every input (reported).
Any failure is InvalidInput (exit 2). The estimate follows the engine's memory model (engine.py) and goes into
the stage's metrics; a pod memory limit below it is logged as a warning.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidInput
from . import engine
from .assets import CONFIG_FILES, TOKENIZER_PATTERNS, _matching
from .model_folder import ModelFolder
from .layout import TIED_ALIASES, VOCAB_NAME, Layout, _is_vocab
from .safetensors_io import DTYPE_NAMES, HASH_CHUNK, TensorInfo, itemsize, planned_bytes

# Config fields that must agree: what the model is and the sizes its tensors are laid out with. vocab_size is
# not among them (the documented trim); tie_word_embeddings neither (layout.py merges tied with untied).
ARCHITECTURE_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "head_dim")
LISTED = 8  # problems named in one error message; the count of the others follows
# Memory model constants (see tensor_working_set): what a method holds besides its inputs' block rows.
METHOD_TEMPORARIES = 8  # block-sized arrays alive at once inside a method (masks, deltas, products)
SAMPLE_ENTRY_BYTES = 28  # arcee_fusion: per sampled score, float32 score + draw + int64 position + sort
SAMPLED_ENTRIES = 1_000_000  # ... of at most this many entries (methods/arcee_fusion.py SAMPLE_SIZE)
BAND_SHARE = 0.03  # ties family: float32 |delta| kept inside the bracket around the cut, per model
# Loaded after the pre-flight: the methods' numba kernels at first call (65 MB measured for ties and
# arcee_fusion from numba's cache; compiling them, as a pod whose NUMBA_CACHE_DIR starts empty does, took
# 43 MB more for ties) and the workers' stacks.
RUNTIME_BYTES = 128 << 20
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@dataclass(frozen=True)
class Input:
    key: str  # how metrics name it: "base", "models[0]"
    folder: ModelFolder


@dataclass(frozen=True)
class Vocab:
    path: Path
    tokens: dict[int, str]  # id -> token, added tokens included

    @property
    def size(self) -> int:
        """Rows a model needs for this tokenizer: the largest id + 1."""
        return max(self.tokens) + 1 if self.tokens else 0


@dataclass
class Preflight:
    """What the checks found, then (``estimate``) the sizes; ``metrics()`` for the stage result."""

    tensors: int = 0
    dtypes: dict[str, str] = field(default_factory=dict)
    tokenizer: str = ""  # identical | compatible (ids agree, sizes differ or a file unreadable) | not compared
    vocab: dict[str, int | str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    peak_memory: int = 0
    working_set: int = 0
    process_bytes: int | None = None
    output_bytes: int = 0
    workers: int = 1
    memory_limit: int | None = None
    output_vocab: Vocab | None = None
    tokenizer_label: str = ""

    def metrics(self) -> dict:
        out: dict = {"tensors": self.tensors, "peakMemoryBytes": self.peak_memory,
                     "workingSetBytes": self.working_set, "outputBytes": self.output_bytes,
                     "workers": self.workers, "dtypes": dict(self.dtypes), "tokenizer": self.tokenizer}
        if self.process_bytes is not None:
            out["processBytes"] = self.process_bytes
        if self.memory_limit is not None:
            out["memoryLimitBytes"] = self.memory_limit
        if self.vocab:
            out["vocab"] = dict(self.vocab)
        return out


# ------------------------------------------------------------------------------------------------ checks

def _fail(what: str, problems: list[str]) -> InvalidInput:
    listed = "; ".join(problems[:LISTED])
    more = f"; and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
    return InvalidInput(f"pre-flight: {what}: {listed}{more}")


def _architecture(config: dict) -> dict:
    fields = {k: config[k] for k in ARCHITECTURE_KEYS if k in config}
    text = config.get("text_config")  # multimodal configs keep the language model's sizes here
    if isinstance(text, dict):
        fields |= {f"text_config.{k}": text[k] for k in ARCHITECTURE_KEYS if k in text}
    return fields


def architecture_problems(reference: ModelFolder, other: ModelFolder) -> list[str]:
    """Fields both config.json files set, with different values (a field only one sets is not compared)."""
    mine, theirs = _architecture(reference.config), _architecture(other.config)
    return [f"{other.label}: config.json has {key} = {theirs[key]!r}, {reference.label} has {mine[key]!r}"
            for key in mine if key in theirs and theirs[key] != mine[key]]


def _file(folder: ModelFolder, name: str) -> str:
    return folder.where[name].path.name


def tensor_problems(reference: ModelFolder, other: ModelFolder) -> list[str]:
    """Missing, extra and differently shaped tensors of ``other``, with layout.py's tolerances."""
    problems = []
    for name in reference.names():
        source = name if name in other else next((a for a in TIED_ALIASES.get(name, ()) if a in other), None)
        if source is None:
            problems.append(f"{other.label}: tensor {name} is missing (in {reference.label} it is in "
                            f"{_file(reference, name)})")
            continue
        mine, theirs = reference.info(name).shape, other.info(source).shape
        if mine != theirs and not _is_vocab(name, [reference, other], [mine, theirs]):
            problems.append(f"tensor {name}: shapes differ: {list(theirs)} in {other.label} "
                            f"({_file(other, source)}), {list(mine)} in {reference.label} ({_file(reference, name)})")
    known = set(reference.names())
    for name in other.names():
        if name in known or (name in TIED_ALIASES and any(a in known for a in TIED_ALIASES[name])):
            continue
        problems.append(f"{other.label}: has tensor {name} ({_file(other, name)}) that {reference.label} lacks")
    return problems


def dtype_summary(folder: ModelFolder) -> str:
    """The input's tensor dtypes, most common first ("BF16", or "F32+I64" when mixed)."""
    counts: dict[torch.dtype, int] = {}
    for name in folder.where:
        dtype = folder.info(name).dtype
        counts[dtype] = counts.get(dtype, 0) + 1
    return "+".join(DTYPE_NAMES[d] for d in sorted(counts, key=lambda d: (-counts[d], DTYPE_NAMES[d])))


def read_vocab(folder: Path, cache: dict[str, Vocab | str]) -> tuple[Vocab | None, str]:
    """The vocabulary of ``folder/tokenizer.json`` (read with the tokenizers library) and the file's sha256,
    or None and why not. Byte-identical files are read once (``cache`` by sha256)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None, f"no tokenizer.json in {folder}"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest not in cache:
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        except Exception as err:  # the library's own error type: not a tokenizer it can read
            cache[digest] = (f"{path} is not a tokenizer the tokenizers library reads "
                             f"({str(err).splitlines()[0][:120] if str(err) else type(err).__name__})")
        else:
            cache[digest] = Vocab(path, {i: t for t, i in vocab.items()})
    found = cache[digest]
    if isinstance(found, str):
        return None, found
    return Vocab(path, found.tokens), digest


def vocab_difference(output: Vocab, other: Vocab) -> str | None:
    """How ``other`` disagrees with the output's tokenizer on the ids both have, or None."""
    shared = output.tokens.keys() & other.tokens.keys()
    differ = sorted(i for i in shared if output.tokens[i] != other.tokens[i])
    if not differ:
        return None
    first = differ[0]
    return (f"token id {first} is {other.tokens[first]!r} in {other.path} and {output.tokens[first]!r} in "
            f"{output.path}; {len(differ)} of {len(shared)} shared ids differ")


def check_inputs(inputs: list[Input], reference: ModelFolder, tokenizer_dir: Path, tokenizer_label: str) -> Preflight:
    """Architecture, tensors, tokenizers and dtypes of every input against ``reference``; InvalidInput
    naming every problem found (up to LISTED), architecture first."""
    report = Preflight(tensors=len(reference.where))
    seen: set[int] = set()
    distinct = []
    for item in inputs:
        report.dtypes[item.key] = dtype_summary(item.folder)
        if id(item.folder) not in seen:
            seen.add(id(item.folder))
            distinct.append(item)
    others = [i.folder for i in distinct if i.folder is not reference]
    problems = [p for f in others for p in architecture_problems(reference, f)]
    if problems:
        raise _fail("the inputs are not the same architecture", problems)
    problems = [p for f in others for p in tensor_problems(reference, f)]
    if problems:
        raise _fail("the inputs' tensors do not match", problems)
    _check_tokenizers(report, distinct, tokenizer_dir, tokenizer_label)
    return report


def _check_tokenizers(report: Preflight, inputs: list[Input], tokenizer_dir: Path, tokenizer_label: str) -> None:
    cache: dict[str, Vocab | str] = {}
    output, output_digest = read_vocab(tokenizer_dir, cache)
    if output is None:  # the metric stays short (it goes into the CR's status); the log says why
        report.tokenizer = "not compared"
        report.notes.append(f"tokenizers not compared: {output_digest}")
        return
    report.output_vocab = output
    # the metric names the field ("spec.base"), the log and errors the URI too: status.metrics is small
    report.vocab |= {"tokens": output.size, "tokenizer": tokenizer_label.split(" (", 1)[0]}
    report.tokenizer_label = tokenizer_label
    identical, problems = True, []
    for item in inputs:
        vocab, digest = read_vocab(item.folder.path, cache)
        if vocab is None:
            identical = False
            report.notes.append(f"{item.folder.label}: tokenizer not compared ({digest})")
            continue
        identical = identical and digest == output_digest
        difference = None if digest == output_digest else vocab_difference(output, vocab)  # same file: same ids
        if difference is not None:
            problems.append(f"{item.folder.label}: {difference}")
        elif vocab.size != output.size:
            report.notes.append(f"{item.folder.label}: its tokenizer has {vocab.size} tokens, the output's "
                                f"{output.size}; the ids they share are the same tokens")
    if problems:
        raise _fail(f"the tokenizers differ from the output's ({tokenizer_label}); the merge would average the "
                    "embeddings of different tokens", problems)
    report.tokenizer = "identical" if identical else "compatible"


# ------------------------------------------------------------------------------------------ estimate

def tensor_working_set(planned, infos: list[TensorInfo], compute_dtype: torch.dtype) -> int:
    """Bytes one engine worker holds while it merges this tensor (engine.py's model):
    - a small (or 1-D) tensor is merged whole: every input's mapped pages plus the inputs in the compute
      dtype and the method's temporaries, each of the tensor's size;
    - a larger one goes in blocks of about BLOCK_BYTES: the inputs' pages stay mapped up to
      RELEASE_LAG_BYTES behind the block being read (twice that when a method starts another pass from the
      top before the last one's tail was dropped), block-sized copies and temporaries, and the method's
      whole-tensor statistics (arcee_fusion's sample of scores, the ties family's band of magnitudes);
    - a non-float tensor is copied from the reference."""
    out = planned.out
    if out.numel == 0:
        return 0
    if not planned.merge:
        return infos[0].nbytes + out.nbytes
    size = itemsize(compute_dtype)
    compute_bytes = out.numel * size
    inputs = len(infos)
    if compute_bytes <= engine.BLOCKED_ABOVE_BYTES or len(out.shape) < 2:
        return sum(i.nbytes for i in infos) + (inputs + METHOD_TEMPORARIES) * compute_bytes
    per_row = compute_bytes // out.shape[0]
    block_rows = min(out.shape[0], max(1, engine.BLOCK_BYTES // per_row))
    mapped = sum(min(i.nbytes, 2 * (engine.RELEASE_LAG_BYTES + block_rows * (i.nbytes // max(1, i.shape[0]))))
                 for i in infos)
    blocks = (inputs + METHOD_TEMPORARIES) * block_rows * per_row
    statistics = min(out.numel, SAMPLED_ENTRIES) * SAMPLE_ENTRY_BYTES + int(BAND_SHARE * out.numel * 4 * inputs)
    return mapped + blocks + statistics


def process_rss() -> int | None:
    """This process's resident memory now (the interpreter, torch, the parsed headers)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit() -> int | None:
    """The container's memory limit (cgroup v2 memory.max, else v1), None when unlimited or unreadable."""
    for path in CGROUP_LIMIT_FILES:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if value < 1 << 60 else None  # v1 writes "unlimited" as about 2**63
    return None


def estimate(report: Preflight, layout: Layout, inputs: list[ModelFolder], compute_dtype: torch.dtype,
             shard_bytes: int, config_dir: Path, tokenizer_dir: Path) -> Preflight:
    """Fill in the vocabulary rows (InvalidInput when they do not cover the output's tokenizer), the
    estimate of peak memory and the output bytes."""
    _check_rows(report, layout)
    report.tensors = len(layout.tensors)
    report.workers = engine.merge_workers()
    sets = sorted((tensor_working_set(p, [f.info(s) for f, s in zip(inputs, p.sources)], compute_dtype)
                   for p in layout.tensors), reverse=True)
    # the workers merge different tensors at once: at worst the largest ones together; the writer reads
    # each shard back in HASH_CHUNK pieces to hash it
    report.working_set = sum(sets[:report.workers]) + HASH_CHUNK + RUNTIME_BYTES
    report.process_bytes = process_rss()
    report.peak_memory = (report.process_bytes or 0) + report.working_set
    assets = [p for p in (config_dir / name for name in CONFIG_FILES) if p.is_file()]
    assets += _matching(tokenizer_dir, TOKENIZER_PATTERNS)
    report.output_bytes = planned_bytes(layout.out_tensors, shard_bytes) + sum(p.stat().st_size for p in assets)
    report.memory_limit = memory_limit()
    return report


def _check_rows(report: Preflight, layout: Layout) -> None:
    rows = [p.out.shape[0] for p in layout.tensors if p.rows is not None or (VOCAB_NAME.search(p.name) and p.out.shape)]
    if not rows:
        return
    kept = min(rows)
    before = max(layout.vocab_rows.values()) if layout.vocab_rows else kept
    report.vocab |= {"rows": kept, "rowsBefore": before, "trimmedRows": before - kept}
    vocab = report.output_vocab
    if vocab is None:
        return
    if vocab.size > kept:
        why = " (trimmed to the rows every input has)" if before > kept else ""
        raise InvalidInput(f"pre-flight: the output's tokenizer {vocab.path} has {vocab.size} tokens but the merged "
                           f"embeddings keep {kept} rows{why}: token ids {kept}..{vocab.size - 1} would have no row")
    report.vocab["paddingRows"] = kept - vocab.size


def log(report: Preflight, stream=None) -> None:
    """The pre-flight's findings in the stage log (stderr); a warning when the estimate exceeds the limit."""
    stream = stream or sys.stderr
    gib = 1 << 30

    def say(text: str) -> None:
        print(f"branchmerge merge: pre-flight: {text}", file=stream)

    say(f"{report.tensors} tensors; dtypes " + ", ".join(f"{k} {v}" for k, v in report.dtypes.items()))
    vocab = report.vocab
    if "paddingRows" in vocab:
        tokens, rows = vocab["tokens"], vocab["rows"]
        text = f"tokenizer {report.tokenizer} ({report.tokenizer_label}: {tokens} tokens)"
        if vocab["trimmedRows"]:
            text += (f"; embedding rows trimmed from {vocab['rowsBefore']} to {rows} (the rows every input has; "
                     f"the dropped rows {rows}..{vocab['rowsBefore'] - 1} are past the last token id)")
        if vocab["paddingRows"]:
            text += (f"; rows {tokens}..{rows - 1} ({vocab['paddingRows']}) are padding, no token id reaches them: "
                     f"the output keeps them, merged like the other rows")
        say(text)
    else:
        say(f"tokenizer {report.tokenizer}")
    for note in report.notes:
        say(note)
    say(f"estimated peak memory {report.peak_memory / gib:.2f} GiB ({report.workers} workers; "
        f"{(report.process_bytes or 0) / gib:.2f} GiB already held by the process), "
        f"output {report.output_bytes / gib:.2f} GiB")
    if report.memory_limit is not None and report.memory_limit < report.peak_memory:
        say(f"WARNING: the memory limit ({report.memory_limit / gib:.2f} GiB, cgroup) is below the estimated peak "
            f"({report.peak_memory / gib:.2f} GiB): the merge may be OOM-killed; raise the limit or lower the "
            f"workers (OMP_NUM_THREADS, from the pod's CPU request)")
