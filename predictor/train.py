"""Fitting the predictors on CASTILLO-schema rows.

The learned model is stacked, and everything it is judged on comes from held-out folds:
1. TF-IDF ridge scores on log(output_mean), over word 1–2-grams and over character 2–5-grams:
   one pooled over all models (each model's verbosity removed as an additive offset), one per
   model. The boosters see the scores of folds that did not train the ridge (grouped by prompt,
   so no prompt text is in both).
2. A location booster on log(output_mean) ranks prompts; quantile boosters on the log length of
   single sampled responses give the distribution.
3. A second round of folds calibrates: per model, an offset per quantile level so each level
   covers its share of held-out responses (split-conformal style), and the scale that turns the
   location into the mean estimate with the least absolute error.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from lenserve.predictor.dataset import LengthRow
from lenserve.predictor.features import feature_matrix, prompt_body
from lenserve.predictor.model import LearnedLengthPredictor, PromptLengthBaseline, stack_features
from lenserve.predictor.text import TextScorer, vectorizer_options
from lenserve.predictor.types import DEFAULT_BUCKET_EDGES

logger = logging.getLogger(__name__)

QUANTILE_LEVELS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass
class TrainConfig:
    num_folds: int = 5  # ridge out-of-fold scores
    num_calibration_folds: int = 3
    ridge_alpha_pooled: float = 3.0
    ridge_alpha_model: float = 1.0
    max_vocabulary: int = 30000
    max_char_vocabulary: int = 100_000  # 0: no character n-gram scores
    num_rounds: int = 400  # location booster
    learning_rate: float = 0.05
    num_quantile_rounds: int = 250
    quantile_learning_rate: float = 0.08
    num_leaves: int = 31
    min_data_in_leaf: int = 40
    max_quantile_rows: int = 60_000  # sampled responses the quantile boosters train on
    num_threads: int = 2
    seed: int = 0
    levels: tuple[float, ...] = QUANTILE_LEVELS


def fit_vectorizer(texts: list[str], min_df: int = 2, max_features: int = 30000, analyzer: str = "word"):
    """Vocabulary, idf and the TF-IDF matrix [num_texts, vocab] of the training texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(**vectorizer_options(analyzer), min_df=min_df, max_features=max_features,
                          sublinear_tf=True, dtype=np.float32)
    x = vec.fit_transform(texts).tocsr()
    vocab = [""] * len(vec.vocabulary_)
    for term, i in vec.vocabulary_.items():
        vocab[i] = term
    return vocab, vec.idf_.astype(np.float32), x


def fit_ridge(x, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import Ridge

    ridge = Ridge(alpha=alpha).fit(x, y)
    return ridge.coef_.astype(np.float32), float(ridge.intercept_)


def group_folds(groups: np.ndarray, num_folds: int, seed: int) -> list[np.ndarray]:
    """Row indices of each test fold; rows sharing a group (a prompt) share a fold."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    fold_of_group = np.random.default_rng(seed).permutation(len(uniq)) % num_folds
    fold = fold_of_group[inverse]
    return [np.flatnonzero(fold == k) for k in range(num_folds)]


def model_offsets(y: np.ndarray, prompt: np.ndarray, model: np.ndarray, num_models: int, num_iters: int = 10) -> np.ndarray:
    """Per-model verbosity b in y ≈ a[prompt] + b[model] (alternating least squares; prompts are shared)."""
    b = np.zeros(num_models)
    num_prompts = int(prompt.max()) + 1
    counts = np.bincount(prompt, minlength=num_prompts).clip(min=1)
    for _ in range(num_iters):
        a = np.bincount(prompt, weights=y - b[model], minlength=num_prompts) / counts
        resid = y - a[prompt]
        b = np.bincount(model, weights=resid, minlength=num_models) / np.bincount(model, minlength=num_models).clip(min=1)
    return b - b.mean()


def _ridge_weights(x, y, prompt, model, num_models, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Weights [vocab, 1 + num_models] and intercepts: pooled (offsets removed), then one ridge per model."""
    offsets = model_offsets(y, prompt, model, num_models)
    w_pooled, b_pooled = fit_ridge(x, y - offsets[model], cfg.ridge_alpha_pooled)
    weights = [w_pooled]
    intercepts = [b_pooled]
    for m in range(num_models):
        rows = np.flatnonzero(model == m)
        w, b = fit_ridge(x[rows], y[rows], cfg.ridge_alpha_model)
        weights.append(w)
        intercepts.append(b)
    if num_models == 1:  # the pooled ridge is the model's own
        weights, intercepts = weights[:1], intercepts[:1]
    return np.stack(weights, axis=1), np.array(intercepts, dtype=np.float32)


def _text_scores(bodies, analyzer, max_features, prompt, model, y, folds, num_models, cfg, t0):
    """(out-of-fold ridge scores [rows, num_scores], the scorer fitted on all rows) for one analyzer."""
    vocab, idf, x_text = fit_vectorizer(bodies, max_features=max_features, analyzer=analyzer)
    x = x_text[prompt]
    oof = np.zeros((len(y), 1 + num_models if num_models > 1 else 1), dtype=np.float32)
    for k, test in enumerate(folds):
        train = np.setdiff1d(np.arange(len(y)), test)
        w, b = _ridge_weights(x[train], y[train], prompt[train], model[train], num_models, cfg)
        oof[test] = np.asarray(x[test] @ w) + b
        logger.info("%s ridge fold %d/%d done (%.0fs)", analyzer, k + 1, len(folds), time.monotonic() - t0)
    w, b = _ridge_weights(x, y, prompt, model, num_models, cfg)
    logger.info("%s vocabulary %d", analyzer, len(vocab))
    return oof, TextScorer(vocab, idf, w, b, analyzer)


def _lgb_params(cfg: TrainConfig, objective: str, alpha: float | None = None) -> dict:
    params = {
        "objective": objective,
        "learning_rate": cfg.learning_rate if alpha is None else cfg.quantile_learning_rate, "num_leaves": cfg.num_leaves,
        "min_data_in_leaf": cfg.min_data_in_leaf, "feature_fraction": 0.8, "bagging_fraction": 0.8,
        "bagging_freq": 1, "lambda_l2": 1.0, "num_threads": cfg.num_threads, "seed": cfg.seed,
        "verbose": -1, "max_bin": 127,
    }
    if alpha is not None:
        params["alpha"] = alpha
    return params


def _train_boosters(x_rows, y_rows, x_samples, y_samples, categorical: int, cfg: TrainConfig):
    import lightgbm as lgb

    def fit(x, y, objective, alpha=None):
        data = lgb.Dataset(x, y, categorical_feature=[categorical] if categorical >= 0 else "auto", free_raw_data=True)
        rounds = cfg.num_rounds if alpha is None else cfg.num_quantile_rounds
        return lgb.train(_lgb_params(cfg, objective, alpha), data, num_boost_round=rounds)

    location = fit(x_rows, y_rows, "regression")
    quantiles = [fit(x_samples, y_samples, "quantile", lv) for lv in cfg.levels]
    return location, quantiles


def _sample_rows(sizes: list[list[int]], max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row index, log length) of the sampled responses the quantile boosters see: an equal number per row."""
    per_row = max(1, min(min(len(s) for s in sizes), max_rows // max(len(sizes), 1)))
    rng = np.random.default_rng(seed)
    index, target = [], []
    for i, s in enumerate(sizes):
        for j in rng.permutation(len(s))[:per_row]:
            index.append(i)
            target.append(np.log(max(s[j], 1)))
    return np.array(index), np.array(target)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def fit_learned(rows: list[LengthRow], cfg: TrainConfig | None = None, default_model: str | None = None,
                edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> LearnedLengthPredictor:
    cfg = cfg or TrainConfig()
    t0 = time.monotonic()
    models = sorted({r.model for r in rows})
    model = np.array([models.index(r.model) for r in rows])
    texts = sorted({r.prompt_text for r in rows})
    text_index = {t: i for i, t in enumerate(texts)}
    prompt = np.array([text_index[r.prompt_text] for r in rows])
    y = np.log(np.maximum([r.output_mean for r in rows], 1.0))
    bodies = [prompt_body(t) for t in texts]
    dense = feature_matrix(bodies)
    logger.info("%d rows, %d prompts, %d models", len(rows), len(texts), len(models))

    # 1. Ridge scores: out-of-fold for the boosters, all rows for the saved scorers.
    folds = group_folds(prompt, cfg.num_folds, cfg.seed)
    oof, scorer = _text_scores(bodies, "word", cfg.max_vocabulary, prompt, model, y, folds, len(models), cfg, t0)
    char_oof, char_scorer = None, None
    if cfg.max_char_vocabulary > 0:
        char_oof, char_scorer = _text_scores(bodies, "char_wb", cfg.max_char_vocabulary, prompt, model, y, folds,
                                             len(models), cfg, t0)

    features = stack_features(dense[prompt], oof, model, char_oof)
    categorical = features.shape[1] - 1 if len(models) > 1 else -1
    sample_row, sample_y = _sample_rows([r.output_sizes for r in rows], cfg.max_quantile_rows, cfg.seed)

    # 2. Calibration on held-out folds of the boosters.
    levels = cfg.levels
    oof_loc = np.zeros(len(rows))
    oof_q = np.zeros((len(rows), len(levels)))
    for k, test in enumerate(group_folds(prompt, cfg.num_calibration_folds, cfg.seed + 1)):
        in_test = np.zeros(len(rows), dtype=bool)
        in_test[test] = True
        s_train = ~in_test[sample_row]
        loc, qs = _train_boosters(features[~in_test], y[~in_test], features[sample_row[s_train]],
                                  sample_y[s_train], categorical, cfg)
        oof_loc[test] = loc.predict(features[test])
        oof_q[test] = np.stack([q.predict(features[test]) for q in qs], axis=1)
        logger.info("calibration fold %d/%d done (%.0fs)", k + 1, cfg.num_calibration_folds, time.monotonic() - t0)
    offsets = np.zeros((len(models), len(levels)))
    mean_scale = np.ones(len(models))
    all_sizes = [np.log(np.maximum(np.array(r.output_sizes, dtype=float), 1.0)) for r in rows]
    for m in range(len(models)):
        idx = np.flatnonzero(model == m)
        resid = np.concatenate([all_sizes[i][:, None] - oof_q[i][None, :] for i in idx])  # [samples, levels]
        offsets[m] = [np.quantile(resid[:, j], lv) for j, lv in enumerate(levels)]
        pred = np.exp(oof_loc[idx])
        mean_scale[m] = weighted_median(np.exp(y[idx]) / pred, pred)

    # 3. Final boosters on all rows.
    location, quantiles = _train_boosters(features, y, features[sample_row], sample_y, categorical, cfg)
    logger.info("trained in %.0fs", time.monotonic() - t0)
    info = {"num_rows": len(rows), "num_prompts": len(texts), "vocabulary": len(scorer.vocabulary),
            "char_vocabulary": len(char_scorer.vocabulary) if char_scorer else 0,
            "rows_per_model": {name: int((model == i).sum()) for i, name in enumerate(models)}}
    return LearnedLengthPredictor(models, default_model or models[0], scorer, location, quantiles, levels,
                                  offsets, mean_scale, edges, info, char_scorer)


def fit_baseline(rows: list[LengthRow], default_model: str | None = None, levels: tuple[float, ...] = QUANTILE_LEVELS,
                 edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> PromptLengthBaseline:
    models = sorted({r.model for r in rows})
    coef = np.zeros((len(models), 2))
    resid_q = np.zeros((len(models), len(levels)))
    for m, name in enumerate(models):
        mine = [r for r in rows if r.model == name]
        n_tok = np.array([r.input_size for r in mine], dtype=float)
        target = np.array([r.output_mean for r in mine])
        design = np.stack([np.ones_like(n_tok), n_tok], axis=1)
        coef[m] = np.linalg.lstsq(design, target, rcond=None)[0]
        pred = design @ coef[m]
        resid = np.concatenate([np.asarray(r.output_sizes, dtype=float) - p for r, p in zip(mine, pred)])
        resid_q[m] = np.quantile(resid, levels)
    return PromptLengthBaseline(models, default_model or models[0], coef, resid_q, levels, edges)
