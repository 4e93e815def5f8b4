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
from collections import Counter

import numpy as np

NGRAM_RANGE = (1, 2)
CHAR_NGRAM_RANGE = (2, 5)
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default
_TOKEN = re.compile(TOKEN_PATTERN)


def terms(text: str) -> list[str]:
    """The unigrams and bigrams of a text, as TfidfVectorizer(ngram_range=(1, 2)) forms them."""
    tokens = _TOKEN.findall(text.lower())
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


def char_terms(text: str) -> list[str]:
    """The character 2–5-grams of each space-padded word, as TfidfVectorizer(analyzer="char_wb",
    ngram_range=(2, 5)) forms them (a word no longer than n counts once, then longer n stop)."""
    lo, hi = CHAR_NGRAM_RANGE
    out: list[str] = []
    for word in text.lower().split():
        w = f" {word} "
        size = len(w)
        for n in range(lo, hi + 1):
            if size <= n:
                out.append(w)
                break
            out.extend([w[i:i + n] for i in range(size - n + 1)])
    return out


ANALYZERS = {"word": terms, "char_wb": char_terms}


def vectorizer_options(analyzer: str) -> dict:
    """scikit-learn TfidfVectorizer arguments whose terms `ANALYZERS[analyzer]` reproduces."""
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
        self.terms = ANALYZERS[analyzer]
        self.vocabulary = vocabulary
        self.index = {t: i for i, t in enumerate(vocabulary)}
        self.idf = idf.astype(np.float32)  # [vocab]
        self.weights = weights.astype(np.float32)  # [vocab, num_scores]
        self.intercepts = intercepts.astype(np.float32)  # [num_scores]

    def scores(self, texts: list[str]) -> np.ndarray:
        out = np.tile(self.intercepts, (len(texts), 1))
        for i, text in enumerate(texts):
            counts = Counter(j for j in map(self.index.get, self.terms(text)) if j is not None)
            if not counts:
                continue
            idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            row = (1.0 + np.log(tf)) * self.idf[idx]
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
