import numpy as np
import pytest

from lenserve.traces.loaders import load_burstgpt
from lenserve.traces.synth import (
    LengthDist,
    SynthConfig,
    fit_config,
    fit_gamma,
    fit_lognormal,
    fit_zipf,
    gamma_from_rate_cv,
    synthesize,
    write_burstgpt_csv,
)


def test_gamma_from_rate_and_cv():
    shape, scale = gamma_from_rate_cv(rate_req_s=4.0, cv=2.0)
    assert shape == pytest.approx(0.25) and scale == pytest.approx(1.0)  # mean gap k*theta = 1/4 s
    with pytest.raises(ValueError, match="rate"):
        gamma_from_rate_cv(0.0, 1.0)


def test_synthesize_is_seeded_and_bounded():
    config = SynthConfig(
        num_requests=5000,
        gamma_shape=0.5,
        gamma_scale=0.4,
        prompt=LengthDist("zipf", zipf_a=1.3, max_tokens=2000),
        output=LengthDist("lognormal", mu=4.0, sigma=0.7, max_tokens=300),
        failure_rate=0.05,
        seed=3,
    )
    trace = synthesize(config)
    c = trace.columns
    assert len(trace) == 5000 and c.arrival_s[0] == 0.0 and np.all(np.diff(c.arrival_s) >= 0)
    assert c.prompt_tokens.min() >= 1 and c.prompt_tokens.max() <= 2000
    assert c.output_tokens[~c.failed].min() >= 1 and c.output_tokens.max() <= 300
    assert np.all(c.output_tokens[c.failed] == 0) and 0.03 < c.failed.mean() < 0.07
    gaps = np.diff(c.arrival_s)
    assert gaps.mean() == pytest.approx(0.2, rel=0.1)  # k * theta
    assert gaps.std() / gaps.mean() == pytest.approx(np.sqrt(2), rel=0.15)  # CV = 1/sqrt(k)
    assert synthesize(config).columns.prompt_tokens.tolist() == c.prompt_tokens.tolist()


def test_duration_cuts_the_trace():
    trace = synthesize(SynthConfig(num_requests=None, duration_s=50.0, gamma_shape=1.0, gamma_scale=0.1))
    assert trace.columns.arrival_s.max() < 50.0
    assert 400 < len(trace) < 600


def test_fits_recover_parameters():
    rng = np.random.default_rng(0)
    shape, scale, method = fit_gamma(rng.gamma(0.7, 2.0, 20000))
    assert method == "mle" and shape == pytest.approx(0.7, rel=0.05) and scale == pytest.approx(2.0, rel=0.07)
    whole_seconds = np.floor(rng.gamma(0.5, 4.0, 20000))  # BurstGPT v1: many zero gaps
    shape, scale, method = fit_gamma(whole_seconds)
    assert method == "moments"
    assert shape * scale == pytest.approx(whole_seconds.mean())
    assert fit_zipf(LengthDist("zipf", zipf_a=1.4, max_tokens=1000).sample(20000, rng), 1000) == pytest.approx(1.4, abs=0.03)
    mu, sigma = fit_lognormal(np.exp(rng.normal(5.0, 0.8, 20000)))
    assert mu == pytest.approx(5.0, abs=0.03) and sigma == pytest.approx(0.8, abs=0.03)


def test_csv_round_trip_and_fit_to_written_trace(tmp_path):
    source = synthesize(SynthConfig(num_requests=3000, gamma_shape=1.0, gamma_scale=0.5, failure_rate=0.1, seed=1))
    path = tmp_path / "synthetic.csv"
    write_burstgpt_csv(source, path)
    loaded = load_burstgpt(path, include_failed=True)
    assert len(loaded) == 3000
    assert np.allclose(loaded.columns.arrival_s, source.columns.arrival_s, atol=1e-3)
    assert loaded.columns.prompt_tokens.tolist() == source.columns.prompt_tokens.tolist()
    assert loaded.columns.failed.tolist() == source.columns.failed.tolist()
    config, info = fit_config(loaded, "lognormal", num_requests=10)
    assert info["rate_req_s"] == pytest.approx(2.0, rel=0.1)
    assert config.failure_rate == pytest.approx(0.1, abs=0.02)
    assert config.prompt.mu == pytest.approx(6.0, abs=0.1) and config.model == "ChatGPT"
    assert len(synthesize(config)) == 10


def test_config_validation():
    with pytest.raises(ValueError, match="zipf exponent"):
        LengthDist("zipf", zipf_a=0.0)
    with pytest.raises(ValueError, match="length distribution"):
        LengthDist("pareto")
    with pytest.raises(ValueError, match="failure rate"):
        SynthConfig(failure_rate=1.0)
