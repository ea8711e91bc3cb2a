"""The decontamination gate (spec.decontaminate of TeacherGen and BranchSFT): which training texts match a
benchmark question, and why.

Reasons, in the order a record is charged to (its first one):

- ``exact``: the normalised text equals a question's normalised text;
- ``near-duplicate``: the Jaccard similarity of the sets of word 5-gram shingles is >= ``near`` (texts of
  5 words or more; shorter ones are exact or nothing);
- ``ngram``: the text shares a word n-gram with a question (Open-R1's rule, n = 8 by default). A question
  of 3..n-1 words has no n-gram: it is a hit when the text contains it whole (Open-R1 skips such questions,
  which lets a short question through even when copied verbatim; under 3 words it would flag common phrases).

Normalisation: Unicode NFKC, lower case, every punctuation character (Unicode category P*) replaced by a
space, whitespace collapsed; words are what is left between spaces. Symbols (``+ = < ^``, category S*) are
kept, so ``3+4-2`` and ``3-4+2`` stay different questions.

Speed: words become ids of the benchmark's vocabulary (a word the benchmark never uses cannot be in any of its
n-grams), n-grams become 64-bit polynomial hashes computed with numpy over a whole batch of texts at once, and
membership is a binary search in the benchmark's sorted hashes. Near-duplicates are exact, not a MinHash
estimate: a text can only reach similarity t with some question if at least ceil(t x |shingles|) of its
distinct shingles occur in the benchmark at all, so only texts passing that vectorised count are compared,
through an inverted index, with the questions they share shingles with.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .datasets import iter_records
from .errors import InvalidInput

REASONS = ("exact", "near-duplicate", "ngram")
SHINGLE = 5  # words per near-duplicate shingle (Lee et al. 2022, NearDup)
SHORT_MIN_WORDS = 3  # shorter questions are matched only exactly
BATCH_WORDS = 4_000_000  # words hashed per numpy batch (bounded memory: ~10 arrays of this many uint64)
_MASK = (1 << 64) - 1


@lru_cache(maxsize=1)
def _punctuation_table() -> dict[int, str]:
    return {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)).startswith("P")}


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation -> space, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_punctuation_table())
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return normalize(text).split()


def _multipliers(n: int) -> np.ndarray:
    """Odd 64-bit constants, one per position in an n-gram (fixed: hashes are comparable across indexes)."""
    rng = np.random.default_rng(20)
    return rng.integers(1, 2 ** 63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


@dataclass
class _Batch:
    """Texts as one array of word ids (0: a word the benchmark does not have) with their boundaries."""

    ids: np.ndarray  # int64 word ids, all texts concatenated
    owner: np.ndarray  # int64 text index of each position
    pos: np.ndarray  # int64 position of each word within its text
    lengths: np.ndarray  # int64 words per text


@dataclass
class Gate:
    """An index of benchmark questions; ``check`` gives each training text its reason (or None)."""

    questions: Sequence[str]
    ngram: int = 8
    near: float = 0.8
    fingerprint: str = ""
    _exact: set = field(default_factory=set, repr=False)
    _vocab: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.ngram < SHORT_MIN_WORDS:
            raise ValueError(f"ngram must be >= {SHORT_MIN_WORDS}")
        tokenised = [words(q) for q in self.questions]
        self._exact = {" ".join(w) for w in tokenised if w}
        vocab: dict[str, int] = {}
        for ws in tokenised:
            for w in ws:
                vocab.setdefault(w, len(vocab) + 1)
        self._vocab = vocab
        rng = np.random.default_rng(7)
        self._keys = rng.integers(1, 2 ** 63, size=len(vocab) + 1, dtype=np.uint64)
        self._keys[0] = 0
        self._mult = _multipliers(max(self.ngram, SHINGLE))
        batch = self._batch(tokenised)
        # n-gram tables: length n for long questions, each shorter length (>= 3) for the short ones
        self._tables: dict[int, np.ndarray] = {}
        lengths = {len(ws) for ws in tokenised}
        for length in sorted({self.ngram} | {n for n in lengths if SHORT_MIN_WORDS <= n < self.ngram}):
            h, owner, _ = self._windows(batch, length)
            if length < self.ngram:  # only whole short questions, not windows of longer ones
                keep = batch.lengths[owner] == length
                h = h[keep]
            if len(h):
                self._tables[length] = np.unique(h)
        # near-duplicate shingles: per question a set, an inverted index, and all of them sorted
        h, owner, _ = self._windows(batch, SHINGLE)
        self._shingles: list[set] = [set() for _ in tokenised]
        postings: dict[int, list[int]] = {}
        for q, value in zip(owner.tolist(), h.tolist()):
            if value not in self._shingles[q]:
                self._shingles[q].add(value)
                postings.setdefault(value, []).append(q)
        self._postings = postings
        self._shingle_table = np.unique(h) if len(h) else np.zeros(0, np.uint64)
        if not self.fingerprint:
            digest = hashlib.sha256(json.dumps([self.ngram, self.near, sorted(self._exact)]).encode())
            self.fingerprint = digest.hexdigest()

    # ---- hashing --------------------------------------------------------------------------------------
    def _batch(self, tokenised: Iterable[list[str]]) -> _Batch:
        get = self._vocab.get
        id_lists = [[get(w, 0) for w in ws] for ws in tokenised]
        lengths = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
        total = int(lengths.sum())
        ids = np.fromiter((i for x in id_lists for i in x), dtype=np.int64, count=total)
        owner = np.repeat(np.arange(len(id_lists), dtype=np.int64), lengths)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else np.zeros(0, np.int64)
        pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
        return _Batch(ids, owner, pos, lengths)

    def _windows(self, batch: _Batch, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hash, text index, all-words-known) of every n-word window inside one text."""
        total = len(batch.ids)
        if total < n:
            empty = np.zeros(0, np.int64)
            return np.zeros(0, np.uint64), empty, np.zeros(0, bool)
        m = total - n + 1
        starts = np.arange(m)
        inside = batch.pos[:m] + n <= batch.lengths[batch.owner[:m]]
        keys = self._keys[batch.ids]
        h = np.zeros(m, dtype=np.uint64)
        for k in range(n):  # uint64 arithmetic wraps: a polynomial hash mod 2^64
            h += keys[k:k + m] * self._mult[k]
        unknown = np.concatenate(([0], np.cumsum(batch.ids == 0)))
        known = (unknown[starts + n] - unknown[starts]) == 0
        return h[inside], batch.owner[:m][inside], known[inside]

    # ---- checks ---------------------------------------------------------------------------------------
    def _ngram_hits(self, batch: _Batch, count: int) -> np.ndarray:
        hit = np.zeros(count, dtype=bool)
        for length, table in self._tables.items():
            h, owner, known = self._windows(batch, length)
            h, owner = h[known], owner[known]
            if not len(h):
                continue
            at = np.minimum(np.searchsorted(table, h), len(table) - 1)
            hit[np.unique(owner[table[at] == h])] = True
        return hit

    def _near_hits(self, batch: _Batch, count: int, skip: np.ndarray) -> np.ndarray:
        hit = np.zeros(count, dtype=bool)
        if not len(self._shingle_table) or self.near > 1:
            return hit
        h, owner, known = self._windows(batch, SHINGLE)
        if not len(h):
            return hit
        # distinct shingles per text, and how many of them the benchmark has at all
        mixed = h ^ (owner.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        _, first = np.unique(mixed, return_index=True)
        distinct = np.bincount(owner[first], minlength=count)
        table = self._shingle_table
        at = np.minimum(np.searchsorted(table, h[first]), len(table) - 1)
        in_bench = known[first] & (table[at] == h[first])
        shared = np.bincount(owner[first][in_bench], minlength=count)
        need = np.ceil(self.near * distinct - 1e-9)
        candidates = np.flatnonzero((shared >= np.maximum(need, 1)) & (distinct > 0) & ~skip)
        if not len(candidates):
            return hit
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(count + 1))
        for t in candidates.tolist():
            mine = set(h[order[bounds[t]:bounds[t + 1]]].tolist())
            overlap = Counter(q for s in mine for q in self._postings.get(s, ()))
            for q, inter in overlap.items():
                if inter / (len(mine) + len(self._shingles[q]) - inter) >= self.near - 1e-12:
                    hit[t] = True
                    break
        return hit

    def check(self, texts: Sequence[str]) -> list[str | None]:
        """The reason of each text (exact, near-duplicate, ngram) or None when it matches no question."""
        out: list[str | None] = [None] * len(texts)
        start = 0
        while start < len(texts):  # batches of about BATCH_WORDS words
            tokenised, size = [], 0
            while start + len(tokenised) < len(texts) and (not tokenised or size < BATCH_WORDS):
                ws = words(texts[start + len(tokenised)])
                tokenised.append(ws)
                size += len(ws)
            self._check_batch(tokenised, out, start)
            start += len(tokenised)
        return out

    def _check_batch(self, tokenised: list[list[str]], out: list, offset: int) -> None:
        count = len(tokenised)
        exact = np.fromiter((" ".join(ws) in self._exact for ws in tokenised), dtype=bool, count=count)
        batch = self._batch(tokenised)
        near = self._near_hits(batch, count, exact)
        ngram = self._ngram_hits(batch, count)
        for i in np.flatnonzero(exact | near | ngram).tolist():
            out[offset + i] = "exact" if exact[i] else "near-duplicate" if near[i] else "ngram"

    def check_records(self, records: Sequence[Sequence[str]]) -> list[str | None]:
        """One reason per record of several texts: the first of REASONS any of its texts has."""
        flat = [t for texts in records for t in texts]
        reasons = self.check(flat)
        out, i = [], 0
        for texts in records:
            mine = [r for r in reasons[i:i + len(texts)] if r]
            out.append(min(mine, key=REASONS.index) if mine else None)
            i += len(texts)
        return out


def counts(reasons: Iterable[str | None]) -> dict[str, int]:
    """{reason: n} over every reason (zeros included, so a declared gate always reports all three)."""
    c = Counter(r for r in reasons if r)
    return {r: c.get(r, 0) for r in REASONS}


def add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {r: a.get(r, 0) + b.get(r, 0) for r in REASONS}


# ---- benchmark datasets ----------------------------------------------------------------------------------

def load_questions(path: Path, fields: Sequence[str], what: str) -> list[str]:
    """The question texts of a benchmark dataset: every present string field of ``fields`` of each record."""
    out = []
    for where, record in iter_records(Path(path), what, columns=list(fields)):
        texts = [record[f] for f in fields if isinstance(record.get(f), str) and record[f].strip()]
        if not texts:
            raise InvalidInput(f"{what}: {where}: no question text (none of the fields {', '.join(fields)}; "
                               f"record fields: {', '.join(sorted(record)) or '-'}): set decontaminate.questionFields")
        out.extend(texts)
    if not out:
        raise InvalidInput(f"{what}: the benchmark has no records")
    return out


def gate_of(spec_decontaminate, input_path, what: str = "spec.decontaminate") -> Gate | None:
    """The gate a stage's spec declares (None: no gate). ``input_path(ref, what)``: StageContext.input_path."""
    d = spec_decontaminate
    if d is None:
        return None
    questions: list[str] = []
    for i, ref in enumerate(d.benchmarks):
        where = f"{what}.benchmarks[{i}]"
        questions += load_questions(input_path(ref, where), d.question_fields, where)
    return Gate(questions, ngram=d.ngram, near=d.near_duplicate)


def describe(spec_decontaminate) -> dict:
    """What a manifest records about the gate (the benchmark URIs and settings)."""
    d = spec_decontaminate
    return {"benchmarks": [ref.uri for ref in d.benchmarks], "questionFields": list(d.question_fields),
            "ngram": d.ngram, "nearDuplicate": d.near_duplicate}


# ---- overlap of published datasets (the report) ----------------------------------------------------------

PROMPT_FIELDS = ("prompt", "problem", "question")
RESPONSE_FIELDS = ("response", "solution", "completion")


def record_texts(record: dict) -> tuple[list[str], list[str]]:
    """(prompt-side texts, response-side texts) of a training record in any layout BranchSFT reads:
    ``messages``/``conversations`` turns (OpenAI role/content or ShareGPT from/value), else prompt/response."""
    turns = record.get("messages") or record.get("conversations")
    if isinstance(turns, list):
        users, answers = [], []
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if isinstance(content, str):
                if role in ("user", "human"):
                    users.append(content)
                elif role in ("assistant", "gpt"):
                    answers.append(content)
        return users, answers
    return ([record[f] for f in PROMPT_FIELDS if isinstance(record.get(f), str)],
            [record[f] for f in RESPONSE_FIELDS if isinstance(record.get(f), str)])


def overlap(gate: Gate, records: Sequence[dict]) -> dict[str, int]:
    """What ``gate`` finds in a dataset: records by reason (their prompt side), and ``responses``: records
    whose response side matches a question (any reason)."""
    texts = [record_texts(r) for r in records]
    found = counts(gate.check_records([prompts for prompts, _ in texts]))
    found["responses"] = sum(1 for r in gate.check_records([answers for _, answers in texts]) if r)
    return {"records": len(records), **found}
