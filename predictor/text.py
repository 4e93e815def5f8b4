"""Bag-of-n-grams text scores: TF-IDF (word 1–2-grams) into ridge regressions on log length.

A ridge over TF-IDF is linear, so a fitted scorer is just a vocabulary, its idf weights and one
weight column per regression; the gradient-boosted model then uses the scores as features.
"""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import Ridge

NGRAM_RANGE = (1, 2)


class TextScorer:
    """scores(texts) -> float32 [num_texts, num_scores]: TF-IDF rows times ridge weights plus intercepts."""

    def __init__(self, vocabulary: list[str], idf: np.ndarray, weights: np.ndarray, intercepts: np.ndarray) -> None:
        self.vocabulary = vocabulary
        self.idf = idf.astype(np.float32)  # [vocab]
        self.weights = weights.astype(np.float32)  # [vocab, num_scores]
        self.intercepts = intercepts.astype(np.float32)  # [num_scores]
        self._counter = CountVectorizer(vocabulary={t: i for i, t in enumerate(vocabulary)}, ngram_range=NGRAM_RANGE)

    def tfidf(self, texts: list[str]) -> sp.csr_matrix:
        counts = self._counter.transform(texts).astype(np.float32).tocsr()
        return tfidf_from_counts(counts, self.idf)

    def scores(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.tfidf(texts) @ self.weights) + self.intercepts

    def save(self, path: str) -> None:
        with gzip.open(os.path.join(path, "vocabulary.json.gz"), "wt", encoding="utf-8") as f:
            json.dump(self.vocabulary, f, ensure_ascii=False)
        np.savez_compressed(
            os.path.join(path, "text_weights.npz"),
            idf=self.idf,
            weights=self.weights,
            intercepts=self.intercepts,
        )

    @classmethod
    def load(cls, path: str) -> "TextScorer":
        with gzip.open(os.path.join(path, "vocabulary.json.gz"), "rt", encoding="utf-8") as f:
            vocabulary = json.load(f)
        arrays = np.load(os.path.join(path, "text_weights.npz"))
        return cls(vocabulary, arrays["idf"], arrays["weights"], arrays["intercepts"])


def tfidf_from_counts(counts: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    """Sublinear tf (1 + log count), times idf, rows scaled to unit length: TfidfVectorizer's transform."""
    x = counts.copy()
    x.data = (1.0 + np.log(x.data)).astype(np.float32)
    x = x @ sp.diags(idf.astype(np.float32))
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.diags((1.0 / norms).astype(np.float32)) @ x


def fit_vectorizer(texts: list[str], min_df: int = 2, max_features: int = 30000) -> tuple[list[str], np.ndarray, sp.csr_matrix]:
    """Vocabulary, idf and the TF-IDF matrix of the training texts."""
    vec = TfidfVectorizer(ngram_range=NGRAM_RANGE, min_df=min_df, max_features=max_features, sublinear_tf=True, dtype=np.float32)
    x = vec.fit_transform(texts).tocsr()
    vocab = [None] * len(vec.vocabulary_)
    for term, i in vec.vocabulary_.items():
        vocab[i] = term
    return vocab, vec.idf_.astype(np.float32), x


def fit_ridge(x: sp.csr_matrix, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    ridge = Ridge(alpha=alpha).fit(x, y)
    return ridge.coef_.astype(np.float32), float(ridge.intercept_)
