"""The hidden-state length probe, model-free: a known linear relation in synthetic states is
recovered with calibrated quantiles; files round-trip; a corrupt or foreign probe is refused."""
import json
import os

import numpy as np
import pytest
from scipy import stats

from lenserve.predictor.dataset import LengthRow
from lenserve.predictor.probe import (HiddenStateProbe, default_layers, fit_probe, load_states_cache, parse_layers,
                                     save_states_cache)

HIDDEN = 32


def _synthetic(num: int, seed: int):
    """States whose direction w sets the log length (plus per-response noise), in a noisy space."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).standard_normal(HIDDEN)
    states = rng.standard_normal((num, HIDDEN)) * 3.0 + 5.0
    mu = 4.0 + 0.3 * ((states - 5.0) / 3.0) @ w / np.sqrt(HIDDEN) * 3
    rows = []
    for i in range(num):
        sizes = np.maximum(1, np.round(np.exp(mu[i] + 0.3 * rng.standard_normal(10)))).astype(int)
        rows.append(LengthRow(prompt_id=f"p{seed}-{i}", model="tiny", prompt_text=f"prompt {i}", input_size=10,
                              output_sizes=sizes.tolist()))
    return states, rows


def test_probe_recovers_a_linear_relation_with_calibrated_quantiles(tmp_path):
    states, rows = _synthetic(600, seed=0)
    probe = fit_probe(states, rows, model="tiny", num_layers=4, layers=(1, 2))
    test_states, test_rows = _synthetic(300, seed=1)
    preds = probe.predict_states(test_states)
    target = [r.output_mean for r in test_rows]
    assert stats.kendalltau([p.mean for p in preds], target).statistic > 0.7
    coverage = np.mean([np.mean(np.asarray(r.output_sizes) <= p.p90) for r, p in zip(test_rows, preds)])
    assert 0.85 <= coverage <= 0.95
    assert all(p.p50 <= p.p90 for p in preds)
    capped = probe.predict_states(test_states[:5], max_tokens=[7] * 5)
    assert all(p.mean <= 7 and p.p90 <= 7 for p in capped)

    probe.save(str(tmp_path))
    again = HiddenStateProbe.load(str(tmp_path))
    assert (again.model, again.num_layers, again.layers, again.hidden_size) == ("tiny", 4, (1, 2), HIDDEN // 2)
    np.testing.assert_allclose([p.mean for p in again.predict_states(test_states)], [p.mean for p in preds], rtol=1e-4)


def test_probe_refuses_another_model_and_wrong_shapes():
    states, rows = _synthetic(60, seed=2)
    probe = fit_probe(states, rows, model="tiny", num_layers=4, layers=(1, 2))
    probe.check_model("tiny", 4, HIDDEN // 2)  # two layers' states side by side
    for other in (("other", 4, HIDDEN // 2), ("tiny", 5, HIDDEN // 2), ("tiny", 4, HIDDEN)):
        with pytest.raises(ValueError, match="cannot read"):
            probe.check_model(*other)
    with pytest.raises(ValueError, match="states of size"):
        probe.predict_states(np.zeros((2, HIDDEN + 1)))
    with pytest.raises(ValueError, match="one state per row"):
        fit_probe(states[:-1], rows, model="tiny", num_layers=4, layers=(1, 2))


def test_missing_or_corrupt_probe_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no length probe"):
        HiddenStateProbe.load(str(tmp_path))
    states, rows = _synthetic(60, seed=3)
    fit_probe(states, rows, model="tiny", num_layers=4, layers=(1, 2)).save(str(tmp_path))
    manifest = tmp_path / "probe.json"
    data = json.loads(manifest.read_text())
    del data["intercept"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        HiddenStateProbe.load(str(tmp_path))
    (tmp_path / "probe.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        HiddenStateProbe.load(str(tmp_path))


def test_states_cache_is_kept_per_model_and_layers(tmp_path):
    path = str(tmp_path / "states.npz")
    states = {"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}
    save_states_cache(path, "tiny", (1, 2), states)
    back = load_states_cache(path, "tiny", (1, 2))
    assert sorted(back) == ["a", "b"] and np.array_equal(back["a"], states["a"])
    assert load_states_cache(path, "tiny", (2,)) == {}  # other layers: recomputed
    assert load_states_cache(path, "other", (1, 2)) == {}
    assert not os.path.exists(path + ".tmp.npz")


def test_default_and_parsed_layers():
    assert default_layers(30) == (16, 24)  # 0-based, of SmolLM2's 30
    assert default_layers(1) == (0,) and default_layers(32) == (17, 26)
    assert parse_layers("16,24") == (16, 24)
    for bad in ("24,16", "16,16", "x", ""):
        with pytest.raises(ValueError):
            parse_layers(bad)
