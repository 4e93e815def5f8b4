"""The served model predicts its own response length: a linear probe on its hidden state.

When a prompt's prefill completes, the engine holds the model's residual stream at the prompt's
last token (for a chat, the `<|im_start|>assistant\\n` that opens the answer). What the model is
about to write is largely decided there (TRAIL, Shahout et al. 2024, reads response lengths off
middle layers): a ridge regression from two middle layers' states to log(output_mean) ranks
SmolLM2's held-out prompts better than any text feature (predictor/README.md has the numbers).

The text predictor still answers at arrival (admission, SJF order and the first KV reservation
come before the prefill); when the prefill completes the engine asks the probe and the scheduler
replaces the estimate with its answer (`Scheduler.refine`: the reservation, the preemption order
and the re-estimation after p90 then use it). Reading the state costs a gather of one row per
sequence and layer at that step, and the probe one dot product: nothing next to the step.

A probe belongs to one model (its name, layer count and hidden size are checked when an engine
takes it). `lenserve predictor probe` collects the states of a CASTILLO-schema dataset's prompts
through the engine and fits it: standardised states, ridge with its strength chosen by
generalised cross-validation, and split-conformal calibration on out-of-fold predictions (an
offset per quantile level so that each covers its share of sampled responses, and the scale that
turns the location into the mean with the least absolute error), as in train.py.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from lenserve.predictor.dataset import LengthRow
from lenserve.predictor.model import make_prediction
from lenserve.predictor.types import DEFAULT_BUCKET_EDGES, LengthPrediction

logger = logging.getLogger(__name__)

PROBE_FILE = "probe.npz"
PROBE_MANIFEST = "probe.json"
LEVELS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
ALPHAS = tuple(float(a) for a in np.logspace(0, 5, 11))


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The layers a probe reads unless told (0-based): 0.53 and 0.8 of the way up, 16 and 24 of
    SmolLM2's 0..29, chosen on the SmolLM2 set's validate split among layers 8, 16, 24 and 29 alone
    and in pairs and triples (Kendall τ 0.54, 0.56, 0.58, 0.53; 16 + 24: 0.60)."""
    picks = (int(round(0.53 * num_layers)), int(round(0.8 * num_layers)))
    return tuple(sorted({min(max(i, 0), num_layers - 1) for i in picks}))


def parse_layers(text: str) -> tuple[int, ...]:
    """"16,24" -> (16, 24): distinct, increasing."""
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"layers must be comma-separated integers, got {text!r}") from None
    if not layers or list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be distinct and increasing, got {text!r}")
    return layers


@dataclass
class HiddenStateProbe:
    model: str  # the served model's name (ModelArchConfig.name)
    num_layers: int
    layers: tuple[int, ...]  # 0-based: the residual stream after each, side by side
    center: np.ndarray  # [len(layers) * hidden]
    scale: np.ndarray
    coef: np.ndarray  # log-length location
    intercept: float
    quantile_offsets: np.ndarray  # [levels], log space, added to the location
    mean_scale: float  # mean tokens = exp(location) * mean_scale
    levels: tuple[float, ...] = LEVELS
    edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES
    info: dict = field(default_factory=dict)

    @property
    def state_size(self) -> int:
        return int(self.coef.shape[0])

    @property
    def hidden_size(self) -> int:
        return self.state_size // len(self.layers)

    def location(self, states: np.ndarray) -> np.ndarray:
        """log-length location of each state [n, hidden] -> [n]."""
        z = (np.asarray(states, dtype=np.float64) - self.center) / self.scale
        return z @ self.coef + self.intercept

    def predict_states(self, states: np.ndarray, max_tokens: list[int | None] | None = None) -> list[LengthPrediction]:
        states = np.atleast_2d(np.asarray(states, dtype=np.float64))
        if states.shape[1] != self.state_size:
            raise ValueError(f"probe expects states of size {self.state_size}, got {states.shape[1]}")
        loc = self.location(states)
        caps = max_tokens if max_tokens is not None else [None] * len(loc)
        return [make_prediction(np.exp(l) * self.mean_scale, np.exp(l + self.quantile_offsets), self.levels, cap, self.edges)
                for l, cap in zip(loc, caps)]

    def read(self, request_ids: list[str], states: np.ndarray, max_tokens: list[int | None]) -> list[LengthPrediction]:
        """What the engine calls when prompts' prefills complete."""
        return self.predict_states(states, max_tokens)

    def check_model(self, name: str, num_layers: int, hidden_size: int) -> None:
        """Raises ValueError unless this probe was fitted on that model."""
        if (name, num_layers, hidden_size) != (self.model, self.num_layers, self.hidden_size) or max(self.layers) >= num_layers:
            raise ValueError(f"length probe fitted on {self.model} ({self.num_layers} layers, hidden {self.hidden_size}) "
                             f"cannot read {name} ({num_layers} layers, hidden {hidden_size})")

    # ---- files -----------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        np.savez_compressed(os.path.join(path, PROBE_FILE), center=self.center.astype(np.float32),
                            scale=self.scale.astype(np.float32), coef=self.coef.astype(np.float32),
                            quantile_offsets=self.quantile_offsets)
        manifest = {"kind": "hidden_state_probe", "model": self.model, "num_layers": self.num_layers, "layers": list(self.layers),
                    "intercept": self.intercept, "mean_scale": self.mean_scale, "levels": list(self.levels),
                    "edges": list(self.edges), "info": self.info}
        with open(os.path.join(path, PROBE_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "HiddenStateProbe":
        manifest_file = os.path.join(path, PROBE_MANIFEST)
        if not os.path.isfile(manifest_file):
            raise FileNotFoundError(f"no length probe in {path} (missing {PROBE_MANIFEST})")
        try:
            with open(manifest_file) as f:
                m = json.load(f)
            arrays = np.load(os.path.join(path, PROBE_FILE))
            probe = cls(m["model"], int(m["num_layers"]), tuple(int(i) for i in m["layers"]), arrays["center"].astype(np.float64),
                        arrays["scale"].astype(np.float64), arrays["coef"].astype(np.float64), float(m["intercept"]),
                        arrays["quantile_offsets"].astype(np.float64), float(m["mean_scale"]), tuple(m["levels"]),
                        tuple(m["edges"]), m.get("info", {}))
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"length probe in {path} is incomplete or corrupt: {e}") from None
        if (not (probe.center.shape == probe.scale.shape == probe.coef.shape) or len(probe.quantile_offsets) != len(probe.levels)
                or not probe.layers or probe.state_size % len(probe.layers)):
            raise ValueError(f"length probe in {path} has inconsistent shapes")
        return probe


def fit_probe(states: np.ndarray, rows: list[LengthRow], model: str, num_layers: int, layers: tuple[int, ...],
              num_folds: int = 5, seed: int = 0, edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> HiddenStateProbe:
    """A probe from the states [n, hidden] of `rows`' prompts (one row per prompt)."""
    from sklearn.linear_model import Ridge, RidgeCV

    from lenserve.predictor.train import weighted_median

    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 2 or len(states) != len(rows):
        raise ValueError(f"need one state per row: {states.shape} for {len(rows)} rows")
    if len(rows) < 2 * num_folds:
        raise ValueError(f"too few rows to fit a probe: {len(rows)}")
    y = np.log(np.maximum([r.output_mean for r in rows], 1.0))
    center = states.mean(axis=0)
    scale = states.std(axis=0) + 1e-6
    z = (states - center) / scale
    alpha = float(RidgeCV(alphas=ALPHAS).fit(z, y).alpha_)
    # out-of-fold locations for calibration
    fold = np.random.default_rng(seed).permutation(len(rows)) % num_folds
    oof = np.zeros(len(rows))
    for k in range(num_folds):
        test = fold == k
        oof[test] = Ridge(alpha=alpha).fit(z[~test], y[~test]).predict(z[test])
    resid = np.concatenate([np.log(np.maximum(np.asarray(r.output_sizes, dtype=float), 1.0)) - o for r, o in zip(rows, oof)])
    offsets = np.array([np.quantile(resid, lv) for lv in LEVELS])
    pred = np.exp(oof)
    mean_scale = weighted_median(np.exp(y) / pred, pred)
    final = Ridge(alpha=alpha).fit(z, y)
    info = {"num_prompts": len(rows), "ridge_alpha": alpha}
    logger.info("probe on layers %s fitted: %d prompts, ridge alpha %.3g", layers, len(rows), alpha)
    return HiddenStateProbe(model, num_layers, tuple(layers), center, scale, final.coef_.astype(np.float64),
                            float(final.intercept_), offsets, float(mean_scale), LEVELS, tuple(edges), info)


class StateRecorder:
    """Stands in for a probe on an engine to collect the states themselves (`read` keeps them by
    request id and predicts nothing)."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = tuple(layers)
        self.states: dict[str, np.ndarray] = {}

    def read(self, request_ids: list[str], states: np.ndarray, max_tokens: list[int | None]) -> None:
        for rid, s in zip(request_ids, states):
            self.states[rid] = np.asarray(s, dtype=np.float32)


def collect_states(engine, texts: list[str], layers: tuple[int, ...], chat: bool = True, show_progress: bool = True,
                   max_in_flight: int = 16) -> np.ndarray:
    """The residual stream after `layers` at the last prompt token of each text [n, len(layers) *
    hidden] (float32), computed by the engine's own prefill (chat-rendered as the server renders a chat)."""
    from tqdm import tqdm

    from lenserve.engine.sampling_params import SamplingParams

    recorder = StateRecorder(layers)
    previous = engine.length_probe
    engine.length_probe = recorder
    params = SamplingParams(max_tokens=1, temperature=0.0)
    limit = engine.max_model_len - 1
    try:
        with tqdm(total=len(texts), desc=f"prompt states (layers {','.join(map(str, layers))})", disable=not show_progress) as bar:
            pending = list(enumerate(texts))[::-1]
            while pending or engine.has_unfinished_requests():
                while pending and len(engine.requests) < max_in_flight:
                    i, text = pending.pop()
                    ids = engine.tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else engine.tokenizer.encode(text)
                    engine.add_request(f"state-{i}", text, params, prompt_token_ids=ids[-limit:])
                for out in engine.step():
                    if out.finished:
                        bar.update(1)
    finally:
        engine.length_probe = previous
    missing = [i for i in range(len(texts)) if f"state-{i}" not in recorder.states]
    if missing:
        raise RuntimeError(f"no prompt state for {len(missing)} texts (first: {missing[0]})")
    return np.stack([recorder.states[f"state-{i}"] for i in range(len(texts))])


def load_states_cache(path: str, model: str, layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """prompt id -> state, from a cache written for the same model and layers (else nothing)."""
    if not path or not os.path.exists(path):
        return {}
    with np.load(path, allow_pickle=False) as data:
        if str(data["model"]) != model or tuple(int(i) for i in data["layers"]) != tuple(layers):
            logger.warning("%s holds states of %s layers %s, not %s layers %s: recomputing", path, data["model"],
                           data["layers"], model, layers)
            return {}
        return {str(pid): s for pid, s in zip(data["prompt_ids"], data["states"])}


def save_states_cache(path: str, model: str, layers: tuple[int, ...], states: dict[str, np.ndarray]) -> None:
    ids = sorted(states)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, model=np.array(model), layers=np.array(layers), prompt_ids=np.array(ids),
                        states=np.stack([states[i] for i in ids]).astype(np.float32))
    os.replace(tmp, path)


def fit_and_evaluate_probe(data: str, out: str, layers: tuple[int, ...] | None = None, model: str | None = None,
                           predictor: str | None = None, states_cache: str | None = None, num_threads: int | None = None,
                           edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES) -> dict:
    """`lenserve predictor probe`: states of every prompt of the served model's dataset, a probe
    fitted on the train split and saved to `out`, and its evaluation on the validate and test
    splits beside the text predictor and the prompt-length baseline on the same rows."""
    from lenserve.config import EngineConfig
    from lenserve.engine.llm_engine import LLMEngine
    from lenserve.predictor.evaluate import evaluate_file
    from lenserve.predictor.make_default import read_served_set
    from lenserve.predictor.metrics import evaluate
    from lenserve.predictor.model import DEFAULT_DIR

    rows, in_progress = read_served_set(data)
    engine = LLMEngine(EngineConfig(model=model, num_threads=num_threads))
    arch = engine.arch
    layers = default_layers(arch.num_layers) if layers is None else tuple(layers)
    if not all(0 <= i < arch.num_layers for i in layers):
        raise ValueError(f"--layers must be in [0, {arch.num_layers}), got {layers}")
    cached = load_states_cache(states_cache, engine.model_name, layers) if states_cache else {}
    todo = [r for r in rows if r.prompt_id not in cached]
    if todo:
        new = collect_states(engine, [r.prompt_text for r in todo], layers)
        cached.update({r.prompt_id: s for r, s in zip(todo, new)})
        if states_cache:
            save_states_cache(states_cache, engine.model_name, layers, cached)
    train = [r for r in rows if r.split == "train"]
    probe = fit_probe(np.stack([cached[r.prompt_id] for r in train]), train, engine.model_name, arch.num_layers, layers,
                      edges=edges)
    probe.info.update({"dataset": os.path.basename(data), "dataset_complete": not in_progress})
    probe.save(out)
    result = {"model": engine.model_name, "layers": list(layers), "dataset": {"path": data, "prompts": len(rows), "complete": not in_progress},
              "train_prompts": len(train), "ridge_alpha": probe.info["ridge_alpha"]}
    for split in ("validate", "test"):
        held = [r for r in rows if r.split == split]
        if not held:
            continue
        preds = probe.predict_states(np.stack([cached[r.prompt_id] for r in held]))
        text = evaluate_file(held, predictor or DEFAULT_DIR, edges)
        result[split] = {"probe": evaluate(held, preds, edges), "text_predictor": {k: v for k, v in text.items() if k != "baseline"},
                         "baseline": text["baseline"]}
    return result
