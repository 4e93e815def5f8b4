"""Bag-of-n-grams text scores: TF-IDF (word 1–2-grams) into ridge regressions on log length.

A ridge over TF-IDF is linear, so a fitted scorer is just a vocabulary, its idf weights and one
weight column per regression; the gradient-boosted model then uses the scores as features.
Scoring reproduces scikit-learn's TfidfVectorizer (default tokens, lower case, sublinear tf, l2
rows) with numpy alone, so serving never imports scikit-learn or scipy (seconds of start-up).
"""
from __future__ import annotations

import gzip
import json
import os
import re
from collections import Counter

import numpy as np

NGRAM_RANGE = (1, 2)
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default
_TOKEN = re.compile(TOKEN_PATTERN)


def terms(text: str) -> list[str]:
    """The unigrams and bigrams of a text, as TfidfVectorizer(ngram_range=(1, 2)) forms them."""
    tokens = _TOKEN.findall(text.lower())
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


class TextScorer:
    """scores(texts) -> float32 [num_texts, num_scores]: TF-IDF rows times ridge weights plus intercepts."""

    def __init__(self, vocabulary: list[str], idf: np.ndarray, weights: np.ndarray, intercepts: np.ndarray) -> None:
        self.vocabulary = vocabulary
        self.index = {t: i for i, t in enumerate(vocabulary)}
        self.idf = idf.astype(np.float32)  # [vocab]
        self.weights = weights.astype(np.float32)  # [vocab, num_scores]
        self.intercepts = intercepts.astype(np.float32)  # [num_scores]

    def scores(self, texts: list[str]) -> np.ndarray:
        out = np.tile(self.intercepts, (len(texts), 1))
        for i, text in enumerate(texts):
            counts = Counter(j for j in map(self.index.get, terms(text)) if j is not None)
            if not counts:
                continue
            idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            row = (1.0 + np.log(tf)) * self.idf[idx]
            out[i] += (row / np.linalg.norm(row)) @ self.weights[idx]
        return out

    def save(self, path: str) -> None:
        with gzip.open(os.path.join(path, "vocabulary.json.gz"), "wt", encoding="utf-8") as f:
            json.dump(self.vocabulary, f, ensure_ascii=False)
        np.savez_compressed(os.path.join(path, "text_weights.npz"), idf=self.idf, weights=self.weights,
                            intercepts=self.intercepts)

    @classmethod
    def load(cls, path: str) -> "TextScorer":
        with gzip.open(os.path.join(path, "vocabulary.json.gz"), "rt", encoding="utf-8") as f:
            vocabulary = json.load(f)
        arrays = np.load(os.path.join(path, "text_weights.npz"))
        return cls(vocabulary, arrays["idf"], arrays["weights"], arrays["intercepts"])
