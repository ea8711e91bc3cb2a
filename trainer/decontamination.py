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
import itertools
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
BATCH_WORDS = 1_000_000  # words hashed per numpy batch (bounded memory: ~10 arrays of this many 8-byte values)
_MASK = (1 << 64) - 1


@lru_cache(maxsize=1)
def _punctuation_table() -> dict[int, str]:
    return {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)).startswith("P")}


def words(text: str) -> list[str]:
    """The words of the normalised text: NFKC, lower case, punctuation -> space, split on whitespace."""
    return unicodedata.normalize("NFKC", text).lower().translate(_punctuation_table()).split()


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation -> space, whitespace collapsed."""
    return " ".join(words(text))


class _HashSet:
    """A sorted array of 64-bit hashes with a bitmap over their top bits in front: most lookups of hashes that
    are not in it end at one random read of the bitmap instead of a binary search (~17 reads)."""

    def __init__(self, hashes: np.ndarray):
        self.sorted = np.unique(hashes)
        bits = int(min(24, max(16, math.ceil(math.log2(max(len(self.sorted), 1) * 64)))))  # ~1.5% false hits
        self.shift = np.uint64(64 - bits)
        self.bitmap = np.zeros(1 << bits, dtype=bool)
        self.bitmap[(self.sorted >> self.shift).astype(np.intp)] = True

    def __len__(self) -> int:
        return len(self.sorted)

    def contains(self, h: np.ndarray) -> np.ndarray:
        found = self.bitmap[(h >> self.shift).astype(np.intp)]
        maybe = np.flatnonzero(found)
        if len(maybe) and len(self.sorted):
            at = np.minimum(np.searchsorted(self.sorted, h[maybe]), len(self.sorted) - 1)
            found[maybe] = self.sorted[at] == h[maybe]
        return found


_SEP = "\x00"  # a text boundary inside the joined batch (not whitespace, not punctuation: survives normalising)
_BASE = 0x9E3779B97F4A7C15  # odd: invertible mod 2^64
_BASE_INV = pow(_BASE, -1, 1 << 64)


@dataclass
class _Batch:
    """Texts as one array of word ids (0: a word the benchmark does not have) with their boundaries, and the
    prefix sums that give the hash of any run of words in two operations."""

    ids: np.ndarray  # int64 word ids, all texts concatenated
    owner: np.ndarray  # int64 text index of each position
    pos: np.ndarray  # int64 position of each word within its text
    lengths: np.ndarray  # int64 words per text
    prefix: np.ndarray  # uint64, len(ids) + 1: sum of key[w_j] * BASE^-j over j < i
    unknown: np.ndarray  # int64, len(ids) + 1: unknown words before position i


@dataclass
class Gate:
    """An index of benchmark questions; ``check`` gives each training text its reason (or None).

    A run of words w_i..w_{i+n-1} hashes to sum_j key[w_j] * BASE^(i+n-1-j) mod 2^64 (random 64-bit word keys):
    the same words give the same hash wherever they are, and with prefix sums every window of a batch costs
    two vector operations. Two different runs collide with probability about 2^-64 per comparison.
    """

    questions: Sequence[str]
    ngram: int = 8
    near: float = 0.8
    fingerprint: str = ""
    _vocab: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.ngram < SHORT_MIN_WORDS:
            raise ValueError(f"ngram must be >= {SHORT_MIN_WORDS}")
        tokenised = [words(q) for q in self.questions]
        vocab: dict[str, int] = {_SEP: -1}
        for ws in tokenised:
            for w in ws:
                if w not in vocab:
                    vocab[w] = len(vocab)
        self._vocab = vocab
        rng = np.random.default_rng(7)
        self._keys = rng.integers(1, 2 ** 63, size=len(vocab) + 1, dtype=np.uint64)
        self._keys[0] = 0
        self._powers = np.ones(1, dtype=np.uint64)  # BASE^i, grown on demand
        self._inverse = np.ones(1, dtype=np.uint64)  # BASE^-i
        batch = self._tokenise([" ".join(ws) for ws in tokenised])
        whole, known = self._whole(batch)
        self._exact = _HashSet(whole[known & (batch.lengths > 0)])
        # n-gram tables: length n for long questions, each shorter length (>= 3) for the short ones (whole)
        self._tables: dict[int, _HashSet] = {}
        if np.any(batch.lengths >= self.ngram):
            self._tables[self.ngram] = _HashSet(self._windows(batch, self.ngram)[0])
        for length in sorted({int(n) for n in batch.lengths if SHORT_MIN_WORDS <= n < self.ngram}):
            self._tables[length] = _HashSet(whole[batch.lengths == length])
        # near-duplicate shingles: per question a set, an inverted index, and all of them sorted
        h, owner, _ = self._windows(batch, SHINGLE)
        self._shingles: list[set] = [set() for _ in tokenised]
        postings: dict[int, list[int]] = {}
        for q, value in zip(owner.tolist(), h.tolist()):
            if value not in self._shingles[q]:
                self._shingles[q].add(value)
                postings.setdefault(value, []).append(q)
        self._postings = postings
        self._shingle_table = _HashSet(h)
        if not self.fingerprint:
            normalised = sorted({" ".join(ws) for ws in tokenised if ws})
            self.fingerprint = hashlib.sha256(json.dumps([self.ngram, self.near, normalised]).encode()).hexdigest()

    # ---- hashing --------------------------------------------------------------------------------------
    def _pow(self, table: str, base: int, count: int) -> np.ndarray:
        have = getattr(self, table)
        if len(have) < count:  # uint64 products wrap: powers mod 2^64
            more = np.full(max(count, 2 * len(have)), base, dtype=np.uint64)
            more[0] = 1
            have = np.cumprod(more, dtype=np.uint64)
            setattr(self, table, have)
        return have[:count]

    def _tokenise(self, texts: Sequence[str]) -> _Batch:
        """Normalise and split a whole batch at once: one call per step instead of one per text."""
        joined = f" {_SEP} ".join(t.replace(_SEP, " ") if _SEP in t else t for t in texts)
        tokens = unicodedata.normalize("NFKC", joined).lower().translate(_punctuation_table()).split()
        # dict.get mapped in C over every word: 0 for a word the benchmark does not have, -1 a boundary
        ids = np.fromiter(map(self._vocab.get, tokens, itertools.repeat(0)), dtype=np.int64, count=len(tokens))
        bounds = np.flatnonzero(ids == -1)
        lengths = np.diff(np.concatenate(([-1], bounds, [len(ids)]))) - 1
        ids = ids[ids != -1]
        total = len(ids)
        owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        pos = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
        prefix = np.zeros(total + 1, dtype=np.uint64)
        np.cumsum(self._keys[ids] * self._pow("_inverse", _BASE_INV, total), out=prefix[1:])
        unknown = np.zeros(total + 1, dtype=np.int64)
        np.cumsum(ids == 0, out=unknown[1:])
        return _Batch(ids, owner, pos, lengths, prefix, unknown)

    def _run_hash(self, batch: _Batch, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Hash of the words [start, end) of the batch (position-independent)."""
        powers = self._pow("_powers", _BASE, len(batch.ids) + 1)
        return powers[np.maximum(end - 1, 0)] * (batch.prefix[end] - batch.prefix[start])

    def _whole(self, batch: _Batch) -> tuple[np.ndarray, np.ndarray]:
        """(hash, all words known) of each whole text."""
        ends = np.cumsum(batch.lengths)
        starts = ends - batch.lengths
        return self._run_hash(batch, starts, ends), batch.unknown[ends] == batch.unknown[starts]

    def _windows(self, batch: _Batch, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hash, text index, all words known) of every n-word window inside one text."""
        total = len(batch.ids)
        if total < n:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, bool)
        m = total - n + 1
        starts = np.flatnonzero(batch.pos[:m] + n <= batch.lengths[batch.owner[:m]])
        h = self._run_hash(batch, starts, starts + n)
        known = batch.unknown[starts + n] == batch.unknown[starts]
        return h, batch.owner[starts], known

    # ---- checks ---------------------------------------------------------------------------------------
    def _ngram_hits(self, batch: _Batch, count: int) -> np.ndarray:
        hit = np.zeros(count, dtype=bool)
        for length, table in self._tables.items():
            h, owner, known = self._windows(batch, length)
            h, owner = h[known], owner[known]
            if len(h):
                hit[owner[table.contains(h)]] = True
        return hit

    def _near_hits(self, batch: _Batch, count: int, skip: np.ndarray) -> np.ndarray:
        hit = np.zeros(count, dtype=bool)
        if not len(self._shingle_table):
            return hit
        h, owner, known = self._windows(batch, SHINGLE)
        if not len(h):
            return hit
        in_bench = known & self._shingle_table.contains(h)
        maybe = np.bincount(owner[in_bench], minlength=count) > 0
        maybe &= ~skip
        if not maybe.any():
            return hit
        keep = maybe[owner]  # the windows of texts sharing at least one shingle with the benchmark
        h, owner, in_bench = h[keep], owner[keep], in_bench[keep]
        # distinct shingles per text, and how many of them the benchmark has at all
        _, first = np.unique(h ^ (owner.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)), return_index=True)
        distinct = np.bincount(owner[first], minlength=count)
        shared = np.bincount(owner[first][in_bench[first]], minlength=count)
        need = np.maximum(np.ceil(self.near * distinct - 1e-9), 1)
        candidates = np.flatnonzero(maybe & (shared >= need))
        bounds = np.searchsorted(owner, np.arange(count + 1))  # windows stay in text order
        for t in candidates.tolist():
            mine = set(h[bounds[t]:bounds[t + 1]].tolist())
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
        while start < len(texts):  # batches of about BATCH_WORDS words (estimated from characters)
            end, chars = start, 0
            while end < len(texts) and (end == start or chars < BATCH_WORDS * 6):
                chars += len(texts[end])
                end += 1
            self._check_batch(texts[start:end], out, start)
            start = end
        return out

    def _check_batch(self, texts: Sequence[str], out: list, offset: int) -> None:
        count = len(texts)
        batch = self._tokenise(texts)
        whole, known = self._whole(batch)
        exact = known & (batch.lengths > 0) & self._exact.contains(whole)
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
