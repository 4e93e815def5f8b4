"""The hidden-state length probe, model-free: a known linear relation in synthetic states is
recovered with calibrated quantiles; files round-trip; a corrupt or foreign probe is refused."""
import json
import os

import numpy as np
import pytest
from scipy import stats

from lenserve.predictor.dataset import LengthRow
from lenserve.predictor.probe import HiddenStateProbe, default_layer, fit_probe, load_states_cache, save_states_cache

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
    probe = fit_probe(states, rows, model="tiny", num_layers=4, layer=2)
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
    assert (again.model, again.num_layers, again.layer) == ("tiny", 4, 2)
    np.testing.assert_allclose([p.mean for p in again.predict_states(test_states)], [p.mean for p in preds], rtol=1e-4)


def test_probe_refuses_another_model_and_wrong_shapes():
    states, rows = _synthetic(60, seed=2)
    probe = fit_probe(states, rows, model="tiny", num_layers=4, layer=2)
    probe.check_model("tiny", 4, HIDDEN)
    for other in (("other", 4, HIDDEN), ("tiny", 5, HIDDEN), ("tiny", 4, HIDDEN + 1)):
        with pytest.raises(ValueError, match="cannot read"):
            probe.check_model(*other)
    with pytest.raises(ValueError, match="states of size"):
        probe.predict_states(np.zeros((2, HIDDEN + 1)))
    with pytest.raises(ValueError, match="one state per row"):
        fit_probe(states[:-1], rows, model="tiny", num_layers=4, layer=2)


def test_missing_or_corrupt_probe_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no length probe"):
        HiddenStateProbe.load(str(tmp_path))
    states, rows = _synthetic(60, seed=3)
    fit_probe(states, rows, model="tiny", num_layers=4, layer=2).save(str(tmp_path))
    manifest = tmp_path / "probe.json"
    data = json.loads(manifest.read_text())
    del data["intercept"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        HiddenStateProbe.load(str(tmp_path))
    (tmp_path / "probe.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        HiddenStateProbe.load(str(tmp_path))


def test_states_cache_is_kept_per_model_and_layer(tmp_path):
    path = str(tmp_path / "states.npz")
    states = {"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}
    save_states_cache(path, "tiny", 2, states)
    back = load_states_cache(path, "tiny", 2)
    assert sorted(back) == ["a", "b"] and np.array_equal(back["a"], states["a"])
    assert load_states_cache(path, "tiny", 3) == {}  # another layer: recomputed
    assert load_states_cache(path, "other", 2) == {}
    assert not os.path.exists(path + ".tmp.npz")


def test_default_layer():
    assert default_layer(30) == 24  # 0-based: the output of SmolLM2's 25th layer of 30
    assert default_layer(1) == 0 and default_layer(32) == 26
