"""Bag-of-n-grams text scores: TF-IDF into ridge regressions on log length.

Two analyzers: word 1–2-grams, and character 2–5-grams inside word boundaries (scikit-learn's
"char_wb"), which read code, identifiers, numbers and misspelt words that whole words miss.
A ridge over TF-IDF is linear, so a fitted scorer is just a vocabulary, its idf weights and one
weight column per regression; the gradient-boosted model then uses the scores as features.
Scoring reproduces scikit-learn's TfidfVectorizer (lower case, sublinear tf, l2 rows; default
word tokens or char_wb n-grams) with numpy alone, so serving never imports scikit-learn or scipy
(seconds of start-up).
"""
from __future__ import annotations

import gzip
import json
import os
import re

import numpy as np

NGRAM_RANGE = (1, 2)
CHAR_NGRAM_RANGE = (2, 5)
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default
_TOKEN = re.compile(TOKEN_PATTERN)


def terms(text: str) -> list[str]:
    """The unigrams and bigrams of a text, as TfidfVectorizer(ngram_range=(1, 2)) forms them."""
    tokens = _TOKEN.findall(text.lower())
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


# Character n-grams are matched by a 64-bit polynomial hash of their code points (and length), so
# a prompt's n-grams are found with a few numpy operations instead of thousands of Python strings.
# Two different n-grams of the vocabulary or the prompt share a hash with odds near 2^-64 per pair.
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)


def _extend(h: np.ndarray, c: np.ndarray) -> np.ndarray:
    """One Horner step of the polynomial hash: the hashes of strings `h` followed by characters `c`."""
    return h * _HASH_BASE + c


def _length_key(h: np.ndarray, n: int) -> np.ndarray:
    return _extend(h, np.uint64(n))


def char_ngram_hashes(text: str) -> np.ndarray:
    """Hashes of the character 2–5-grams of each space-padded word, as TfidfVectorizer(analyzer=
    "char_wb", ngram_range=(2, 5)) forms them (its lower-casing and whitespace split). A padded word
    has at least 3 characters, so its n-grams are exactly its substrings of 2 to 5 characters."""
    words = text.lower().split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    c = _code_points("".join([f" {w} " for w in words]))
    word = np.repeat(np.arange(len(words)), [len(w) + 2 for w in words])
    h, keys = c, []
    lo, hi = CHAR_NGRAM_RANGE
    for n in range(2, hi + 1):
        h = _extend(h[:-1], c[n - 1:])  # window [i, i + n)
        if n >= lo:
            keys.append(_length_key(h[word[:len(h)] == word[n - 1:]], n))
    return np.concatenate(keys)


def _term_hashes(vocabulary: list[str]) -> np.ndarray:
    """The char_ngram_hashes key of each character n-gram term, vectorised by term length."""
    out = np.zeros(len(vocabulary), dtype=np.uint64)
    lengths = np.array([len(t) for t in vocabulary])
    for n in np.unique(lengths):
        rows = np.flatnonzero(lengths == n)
        c = _code_points("".join(vocabulary[i] for i in rows)).reshape(len(rows), n)
        h = c[:, 0]
        for j in range(1, n):
            h = _extend(h, c[:, j])
        out[rows] = _length_key(h, int(n))
    return out


ANALYZERS = ("word", "char_wb")


def vectorizer_options(analyzer: str) -> dict:
    """scikit-learn TfidfVectorizer arguments whose terms TextScorer(analyzer=...) reproduces."""
    if analyzer == "word":
        return {"ngram_range": NGRAM_RANGE, "token_pattern": TOKEN_PATTERN}
    if analyzer == "char_wb":
        return {"analyzer": "char_wb", "ngram_range": CHAR_NGRAM_RANGE}
    raise ValueError(f"unknown analyzer {analyzer!r} (known: {sorted(ANALYZERS)})")


class TextScorer:
    """scores(texts) -> float32 [num_texts, num_scores]: TF-IDF rows times ridge weights plus intercepts."""

    def __init__(self, vocabulary: list[str], idf: np.ndarray, weights: np.ndarray, intercepts: np.ndarray,
                 analyzer: str = "word") -> None:
        if analyzer not in ANALYZERS:
            raise ValueError(f"unknown analyzer {analyzer!r} (known: {sorted(ANALYZERS)})")
        self.analyzer = analyzer
        self.vocabulary = vocabulary
        if analyzer == "word":
            self.index = {t: i for i, t in enumerate(vocabulary)}
        else:
            hashes = _term_hashes(vocabulary)
            self._order = np.argsort(hashes)
            self._sorted_hashes = hashes[self._order]
        self.idf = idf.astype(np.float32)  # [vocab]
        self.weights = weights.astype(np.float32)  # [vocab, num_scores]
        self.intercepts = intercepts.astype(np.float32)  # [num_scores]

    def term_counts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(vocabulary indices, how often each occurs) of the text's known terms."""
        if self.analyzer == "word":
            ids = [j for j in map(self.index.get, terms(text)) if j is not None]
            return np.unique(np.array(ids, dtype=np.int64), return_counts=True)
        keys, counts = np.unique(char_ngram_hashes(text), return_counts=True)  # sorted: a cache-friendly search
        if not len(self._sorted_hashes) or not len(keys):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_hashes, keys), len(self._sorted_hashes) - 1)
        hit = self._sorted_hashes[pos] == keys
        return self._order[pos[hit]], counts[hit]

    def scores(self, texts: list[str]) -> np.ndarray:
        out = np.tile(self.intercepts, (len(texts), 1))
        for i, text in enumerate(texts):
            idx, tf = self.term_counts(text)
            if not len(idx):
                continue
            row = (1.0 + np.log(tf.astype(np.float32))) * self.idf[idx]
            out[i] += (row / np.linalg.norm(row)) @ self.weights[idx]
        return out

    def save(self, path: str, prefix: str = "") -> None:
        """Writes `{prefix}vocabulary.json.gz` and `{prefix}text_weights.npz` in directory `path`."""
        with gzip.open(os.path.join(path, f"{prefix}vocabulary.json.gz"), "wt", encoding="utf-8") as f:
            json.dump(self.vocabulary, f, ensure_ascii=False)
        np.savez_compressed(os.path.join(path, f"{prefix}text_weights.npz"), idf=self.idf, weights=self.weights,
                            intercepts=self.intercepts, analyzer=np.array(self.analyzer))

    @classmethod
    def load(cls, path: str, prefix: str = "") -> "TextScorer":
        with gzip.open(os.path.join(path, f"{prefix}vocabulary.json.gz"), "rt", encoding="utf-8") as f:
            vocabulary = json.load(f)
        arrays = np.load(os.path.join(path, f"{prefix}text_weights.npz"))
        analyzer = str(arrays["analyzer"]) if "analyzer" in arrays.files else "word"
        return cls(vocabulary, arrays["idf"], arrays["weights"], arrays["intercepts"], analyzer)
