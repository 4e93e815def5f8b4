"""Length predictors: one interface, a prompt-length baseline, and the learned model.

    predictor = load_predictor("predictor/models/default")
    [pred] = predictor.predict([PromptInput(text, num_tokens=412, max_tokens=1024)])
    pred.mean, pred.p50, pred.p90, pred.bucket, pred.quantiles

A directory holds one predictor: `manifest.json` names its kind; `baseline/` (when present) holds
the prompt-length baseline fitted on the same rows, so evaluation can compare the two.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from abc import ABC, abstractmethod

import numpy as np

from lenserve.predictor.features import feature_matrix, prompt_body
from lenserve.predictor.types import DEFAULT_BUCKET_EDGES, LengthPrediction, PromptInput, bucket_of

FORMAT_VERSION = 1
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "default")
CHAR_PREFIX = "char_"  # file prefix of the character n-gram scorer in a saved predictor


class LengthPredictor(ABC):
    """Predicts the response-length distribution of prompts for one or more LLMs."""

    kind: str = ""

    def __init__(self, models: list[str], default_model: str, edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> None:
        if default_model not in models:
            raise ValueError(f"default_model {default_model!r} is not among the trained models {models}")
        self.models = list(models)
        self.default_model = default_model
        self.edges = tuple(edges)

    def model_index(self, model: str | None) -> int:
        """The trained model to answer for: `model` when it was trained on, else the default."""
        return self.models.index(model) if model in self.models else self.models.index(self.default_model)

    def resolve_model(self, *names: str | None) -> str:
        """The trained model that a served model answers as: the first of `names` that is a trained
        model's full name or its last path part, case aside (a checkpoint folder
        "Llama-3.2-1B-Instruct" is "meta-llama/Llama-3.2-1B-Instruct"), else the default model."""
        by_short = {m.rsplit("/", 1)[-1].lower(): m for m in self.models}
        for name in names:
            if not name:
                continue
            if name in self.models:
                return name
            short = name.rstrip("/").rsplit("/", 1)[-1].lower()
            if short in by_short:
                return by_short[short]
        return self.default_model

    @abstractmethod
    def _predict_log_quantiles(self, prompts: list[PromptInput], model: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        """(means [n], quantiles [n, num_levels] in tokens, levels) before clipping to max_tokens."""

    def predict(self, prompts: list[PromptInput], model: str | None = None) -> list[LengthPrediction]:
        """Predictions for `prompts` as answered by `model` (default: the predictor's default model)."""
        if not prompts:
            return []
        means, quantiles, levels = self._predict_log_quantiles(list(prompts), self.model_index(model))
        return [make_prediction(mean, qs, levels, prompt.max_tokens, self.edges)
                for prompt, mean, qs in zip(prompts, means, quantiles)]

    @abstractmethod
    def save(self, path: str) -> None: ...

    @classmethod
    @abstractmethod
    def load(cls, path: str) -> "LengthPredictor": ...

    def _manifest(self, **extra) -> dict:
        return {"kind": self.kind, "format_version": FORMAT_VERSION, "models": self.models,
                "default_model": self.default_model, "edges": list(self.edges), **extra}


def make_prediction(mean: float, quantiles: np.ndarray, levels: tuple[float, ...], max_tokens: int | None,
                    edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> LengthPrediction:
    """A prediction from a mean and quantiles in tokens: at least 1, quantiles non-decreasing, both
    capped at `max_tokens`."""
    qs = np.maximum.accumulate(np.maximum(quantiles, 1.0))
    mean = max(float(mean), 1.0)
    if max_tokens is not None:
        qs = np.minimum(qs, max_tokens)
        mean = min(mean, float(max_tokens))
    by_level = {lv: float(q) for lv, q in zip(levels, qs)}
    return LengthPrediction(mean=mean, p50=_at_level(by_level, 0.5), p90=_at_level(by_level, 0.9),
                            bucket=bucket_of(mean, edges), quantiles=by_level)


def _at_level(by_level: dict[float, float], level: float) -> float:
    """The quantile at `level`, interpolated in log space between the predicted levels."""
    if level in by_level:
        return by_level[level]
    levels = sorted(by_level)
    lo = max((u for u in levels if u < level), default=levels[0])
    hi = min((u for u in levels if u > level), default=levels[-1])
    if lo == hi:
        return by_level[lo]
    t = (level - lo) / (hi - lo)
    return math.exp((1 - t) * math.log(by_level[lo]) + t * math.log(by_level[hi]))


def _write_manifest(path: str, manifest: dict) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


def read_manifest(path: str) -> dict:
    file = os.path.join(path, "manifest.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no predictor in {path} (missing manifest.json)")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}")
    return manifest


class PromptLengthBaseline(LengthPredictor):
    """What a scheduler without a predictor can do: per model, response length linear in prompt tokens
    (least squares), with quantiles from the training residuals of the sampled lengths."""

    kind = "prompt_length"

    def __init__(self, models, default_model, coef: np.ndarray, residual_quantiles: np.ndarray,
                 levels: tuple[float, ...], edges=DEFAULT_BUCKET_EDGES) -> None:
        super().__init__(models, default_model, edges)
        self.coef = np.asarray(coef, dtype=np.float64)  # [num_models, 2]: intercept, slope
        self.residual_quantiles = np.asarray(residual_quantiles, dtype=np.float64)  # [num_models, num_levels]
        self.levels = tuple(levels)

    def _predict_log_quantiles(self, prompts, model):
        num_tokens = np.array([p.num_tokens for p in prompts], dtype=np.float64)
        means = self.coef[model, 0] + self.coef[model, 1] * num_tokens
        return means, means[:, None] + self.residual_quantiles[model][None, :], self.levels

    def save(self, path: str) -> None:
        _write_manifest(path, self._manifest(coef=self.coef.tolist(), residual_quantiles=self.residual_quantiles.tolist(),
                                             levels=list(self.levels)))

    @classmethod
    def load(cls, path: str) -> "PromptLengthBaseline":
        m = read_manifest(path)
        return cls(m["models"], m["default_model"], np.array(m["coef"]), np.array(m["residual_quantiles"]),
                   tuple(m["levels"]), tuple(m["edges"]))


class LearnedLengthPredictor(LengthPredictor):
    """Gradient-boosted trees over prompt features (see features.py) and TF-IDF ridge scores.

    One booster predicts the log of the mean length (it ranks prompts); one quantile booster per
    level predicts the log-length distribution of a single sampled response, shifted by offsets
    calibrated on held-out folds so that each level covers its share of responses.
    """

    kind = "learned"

    def __init__(self, models, default_model, scorer, location, quantile_boosters, levels, quantile_offsets,
                 mean_scale, edges=DEFAULT_BUCKET_EDGES, info: dict | None = None, char_scorer=None) -> None:
        super().__init__(models, default_model, edges)
        self.scorer = scorer  # TextScorer: column 0 pooled over models, then one column per model
        self.char_scorer = char_scorer  # the same over character n-grams, or None (predictors saved before it)
        self.location = location  # lightgbm.Booster
        self.quantile_boosters = list(quantile_boosters)
        self.levels = tuple(levels)
        self.quantile_offsets = np.asarray(quantile_offsets, dtype=np.float64)  # [num_models, num_levels], log space
        self.mean_scale = np.asarray(mean_scale, dtype=np.float64)  # [num_models]
        self.info = info or {}

    def features(self, texts: list[str], model: int | np.ndarray) -> np.ndarray:
        """GBM input [n, num_features]: dense features | pooled score | own-model score | all models' scores |
        character n-gram pooled and own-model scores | model."""
        bodies = [prompt_body(t) for t in texts]
        dense = feature_matrix(bodies)
        scores = self.scorer.scores(bodies)
        char_scores = self.char_scorer.scores(bodies) if self.char_scorer is not None else None
        return stack_features(dense, scores, np.broadcast_to(np.asarray(model), (len(texts),)), char_scores)

    def _predict_log_quantiles(self, prompts, model):
        x = self.features([p.text for p in prompts], model)
        log_mean = self.location.predict(x, num_threads=1)
        log_q = np.stack([b.predict(x, num_threads=1) for b in self.quantile_boosters], axis=1)
        log_q = log_q + self.quantile_offsets[model][None, :]
        return np.exp(log_mean) * self.mean_scale[model], np.exp(log_q), self.levels

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.scorer.save(path)
        if self.char_scorer is not None:
            self.char_scorer.save(path, prefix=CHAR_PREFIX)
        _save_booster(self.location, os.path.join(path, "location.txt.gz"))
        names = [f"quantile_{int(round(lv * 100)):02d}.txt.gz" for lv in self.levels]
        for booster, name in zip(self.quantile_boosters, names):
            _save_booster(booster, os.path.join(path, name))
        _write_manifest(path, self._manifest(levels=list(self.levels), quantile_files=names,
                                             quantile_offsets=self.quantile_offsets.tolist(),
                                             mean_scale=self.mean_scale.tolist(), info=self.info,
                                             char_scores=self.char_scorer is not None))

    @classmethod
    def load(cls, path: str) -> "LearnedLengthPredictor":
        lgb = _import_lightgbm()

        from lenserve.predictor.text import TextScorer

        m = read_manifest(path)
        try:
            scorer = TextScorer.load(path)
            char_scorer = TextScorer.load(path, CHAR_PREFIX) if m.get("char_scores") else None
            location = _load_booster(os.path.join(path, "location.txt.gz"))
            quantiles = [_load_booster(os.path.join(path, name)) for name in m["quantile_files"]]
        except (OSError, EOFError, KeyError, ValueError, lgb.basic.LightGBMError) as e:
            raise ValueError(f"predictor in {path} is incomplete or corrupt: {e}") from None
        return cls(m["models"], m["default_model"], scorer, location, quantiles, tuple(m["levels"]),
                   np.array(m["quantile_offsets"]), np.array(m["mean_scale"]), tuple(m["edges"]), m.get("info"),
                   char_scorer)


def _save_booster(booster, file: str) -> None:
    with gzip.open(file, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write(booster.model_to_string())


def _import_lightgbm():
    """lightgbm, imported without its optional scikit-learn glue when scikit-learn is not loaded yet:
    that glue imports all of scikit-learn (seconds), and a Booster never needs it."""
    import sys

    if "lightgbm" not in sys.modules and "sklearn" not in sys.modules:
        sys.modules["sklearn"] = None  # makes lightgbm's `import sklearn` fail, so it skips the glue
        try:
            import lightgbm
        finally:
            del sys.modules["sklearn"]
    import lightgbm

    return lightgbm


def _load_booster(file: str):
    lgb = _import_lightgbm()

    with gzip.open(file, "rt", encoding="utf-8") as f:
        return lgb.Booster(model_str=f.read())


def stack_features(dense: np.ndarray, scores: np.ndarray, model: np.ndarray, char_scores: np.ndarray | None = None) -> np.ndarray:
    """dense [n, d], scores [n, 1 + num_models] (pooled, then per model), model [n], optional
    char_scores shaped like scores -> [n, d + 3 + num_models (+ 2)]; the model index is last."""
    n = dense.shape[0]
    model = np.asarray(model, dtype=np.int64)

    def pooled_and_own(s: np.ndarray) -> list[np.ndarray]:
        return [s[:, :1], (s[np.arange(n), 1 + model] if s.shape[1] > 1 else s[:, 0])[:, None]]

    parts = [dense, *pooled_and_own(scores), scores[:, 1:]]
    if char_scores is not None:
        parts += pooled_and_own(char_scores)
    return np.hstack(parts + [model[:, None].astype(np.float32)]).astype(np.float32)


_KINDS: dict[str, type[LengthPredictor]] = {
    PromptLengthBaseline.kind: PromptLengthBaseline,
    LearnedLengthPredictor.kind: LearnedLengthPredictor,
}


def load_predictor(path: str) -> LengthPredictor:
    """The predictor saved in directory `path` (any kind)."""
    kind = read_manifest(path).get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown predictor kind {kind!r} (known: {sorted(_KINDS)})")
    return _KINDS[kind].load(path)


def load_baseline(path: str) -> LengthPredictor:
    """The prompt-length baseline stored next to a trained predictor (in `path/baseline`)."""
    return load_predictor(os.path.join(path, "baseline"))


def load_default_predictor() -> LengthPredictor:
    """The predictor shipped with lenserve for the embedded SmolLM2 (predictor/models/default)."""
    return load_predictor(DEFAULT_DIR)
