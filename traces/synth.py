"""BurstGPT-style synthetic traces: Gamma inter-arrival times, Zipf or lognormal lengths.

BurstGPT (Wang et al., 2024) models arrivals as a Gamma renewal process and request lengths as
Zipf-like; this module samples such traces, fits the parameters to a real trace, and writes
BurstGPT CSV. Lengths are drawn from distributions truncated to [1, max_tokens]: Zipf as a
discrete power law p(k) ∝ k^-a on 1..max (any a > 0), lognormal by rounding exp(N(mu, sigma)).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from lenserve.traces.trace import Trace, TraceColumns

LENGTH_KINDS = ("zipf", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    kind: str = "lognormal"  # zipf | lognormal
    zipf_a: float = 1.2  # exponent of p(k) ∝ k^-a
    mu: float = 6.0  # lognormal: mean of log(tokens)
    sigma: float = 1.0  # lognormal: std of log(tokens)
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"length distribution must be one of {', '.join(LENGTH_KINDS)}, got {self.kind!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max tokens must be >= 1, got {self.max_tokens}")
        if self.kind == "zipf" and not self.zipf_a > 0:
            raise ValueError(f"zipf exponent must be > 0, got {self.zipf_a}")
        if self.kind == "lognormal" and not self.sigma >= 0:
            raise ValueError(f"lognormal sigma must be >= 0, got {self.sigma}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "zipf":
            k = np.arange(1, self.max_tokens + 1, dtype=np.float64)
            cdf = np.cumsum(k ** -self.zipf_a)
            return np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").astype(np.int64) + 1
        x = np.rint(np.exp(rng.normal(self.mu, self.sigma, n)))
        return np.clip(x, 1, self.max_tokens).astype(np.int64)


@dataclass(frozen=True)
class SynthConfig:
    num_requests: int | None = 1000  # stop after this many requests ...
    duration_s: float | None = None  # ... or after this many seconds (whichever is given / first)
    gamma_shape: float = 0.25  # inter-arrival Gamma(k, theta): CV = 1/sqrt(k)
    gamma_scale: float = 4.0  # mean inter-arrival = k * theta seconds
    prompt: LengthDist = field(default_factory=lambda: LengthDist(mu=6.0, sigma=1.0, max_tokens=4096))
    output: LengthDist = field(default_factory=lambda: LengthDist(mu=5.3, sigma=0.8, max_tokens=2048))
    failure_rate: float = 0.0  # fraction of rows written with 0 response tokens (BurstGPT failures)
    model: str = "ChatGPT"
    log_type: str = "Conversation log"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give a number of requests or a duration")
        if self.num_requests is not None and self.num_requests < 0:
            raise ValueError(f"number of requests must be >= 0, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")
        if not (self.gamma_shape > 0 and self.gamma_scale > 0):
            raise ValueError(f"gamma shape and scale must be > 0, got {self.gamma_shape}, {self.gamma_scale}")
        if not 0 <= self.failure_rate < 1:
            raise ValueError(f"failure rate must be in [0, 1), got {self.failure_rate}")


def gamma_from_rate_cv(rate_req_s: float, cv: float) -> tuple[float, float]:
    """(shape, scale) of Gamma inter-arrivals with mean 1/rate and coefficient of variation cv."""
    if not rate_req_s > 0:
        raise ValueError(f"rate must be > 0 req/s, got {rate_req_s}")
    if not cv > 0:
        raise ValueError(f"CV must be > 0, got {cv}")
    shape = 1.0 / (cv * cv)
    return shape, 1.0 / (rate_req_s * shape)


def _arrivals(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Gamma renewal process starting at 0: num_requests arrivals, cut at duration_s."""
    if config.num_requests == 0:
        return np.empty(0)
    mean_gap = config.gamma_shape * config.gamma_scale
    batch = config.num_requests or max(16, int(config.duration_s / mean_gap) + 1)
    parts, t = [], 0.0
    while True:
        gaps = rng.gamma(config.gamma_shape, config.gamma_scale, batch)
        if not parts:
            gaps[0] = 0.0
        parts.append(t + np.cumsum(gaps))
        t = float(parts[-1][-1])
        if config.num_requests is not None or t >= config.duration_s:
            break
    arrival = np.concatenate(parts)
    return arrival[arrival < config.duration_s] if config.duration_s is not None else arrival


def synthesize(config: SynthConfig) -> Trace:
    rng = np.random.default_rng(config.seed)
    arrival = _arrivals(config, rng)
    n = len(arrival)
    prompt = config.prompt.sample(n, rng)
    output = config.output.sample(n, rng)
    failed = rng.random(n) < config.failure_rate
    output[failed] = 0
    columns = TraceColumns(
        arrival_s=arrival,
        prompt_tokens=prompt,
        output_tokens=output,
        failed=failed,
        model_index=np.zeros(n, np.int32),
        model_names=(config.model,),
    )
    meta = {"format": "synthetic", "log_type": config.log_type, "config": asdict(config)}
    return Trace.from_columns(columns, name="synthetic", source=f"synthetic: {describe(config)}", meta=meta)


def describe(config: SynthConfig) -> str:
    def length(d: LengthDist) -> str:
        if d.kind == "zipf":
            return f"zipf(a={d.zipf_a:.3g}, max={d.max_tokens})"
        return f"lognormal(mu={d.mu:.3g}, sigma={d.sigma:.3g}, max={d.max_tokens})"

    return (
        f"gamma(shape={config.gamma_shape:.3g}, scale={config.gamma_scale:.3g}) arrivals, "
        f"prompt {length(config.prompt)}, output {length(config.output)}, seed {config.seed}"
    )


# ---------------------------------------------------------------------------------------------
# Fitting


def fit_gamma(gaps_s: np.ndarray) -> tuple[float, float, str]:
    """(shape, scale, method) of inter-arrival gaps.

    Maximum likelihood (scipy) needs positive gaps; traces with whole-second timestamps (BurstGPT
    v1) have many zero gaps, for which the method of moments (matching mean and variance) is used.
    """
    from scipy import stats

    gaps_s = np.asarray(gaps_s, np.float64)
    if len(gaps_s) < 2 or gaps_s.mean() <= 0:
        raise ValueError("need at least 3 requests spread over time to fit inter-arrival times")
    positive = gaps_s[gaps_s > 0]
    if len(positive) >= 0.99 * len(gaps_s) and len(positive) >= 2:
        shape, _, scale = stats.gamma.fit(positive, floc=0)
        return float(shape), float(scale), "mle"
    mean, var = gaps_s.mean(), gaps_s.var()
    if var <= 0:
        raise ValueError("inter-arrival times have no variance; cannot fit a Gamma distribution")
    return float(mean * mean / var), float(var / mean), "moments"


def fit_zipf(lengths: np.ndarray, max_tokens: int | None = None) -> float:
    """Maximum-likelihood exponent a of p(k) ∝ k^-a on 1..max_tokens."""
    from scipy import optimize

    x = np.asarray(lengths, np.float64)
    x = x[x >= 1]
    if not len(x):
        raise ValueError("no positive lengths to fit")
    kmax = int(max_tokens or x.max())
    k = np.arange(1, kmax + 1, dtype=np.float64)
    log_k = np.log(k)
    sum_log_x = np.log(x).sum()

    def neg_log_likelihood(a: float) -> float:
        return a * sum_log_x + len(x) * math.log(np.exp(-a * log_k).sum())

    return float(optimize.minimize_scalar(neg_log_likelihood, bounds=(1e-3, 10.0), method="bounded").x)


def fit_lognormal(lengths: np.ndarray) -> tuple[float, float]:
    """(mu, sigma) of log(length): the lognormal maximum-likelihood estimate with location 0."""
    x = np.asarray(lengths, np.float64)
    x = x[x >= 1]
    if not len(x):
        raise ValueError("no positive lengths to fit")
    log_x = np.log(x)
    return float(log_x.mean()), float(log_x.std())


def fit_config(trace: Trace, length_kind: str = "lognormal", **overrides) -> tuple[SynthConfig, dict]:
    """A SynthConfig whose distributions are fitted to `trace`, and a dict describing the fit."""
    if length_kind not in LENGTH_KINDS:
        raise ValueError(f"length distribution must be one of {', '.join(LENGTH_KINDS)}, got {length_kind!r}")
    c = trace.columns
    if len(c) < 3:
        raise ValueError(f"{trace.source}: need at least 3 requests to fit, found {len(c)}")
    ok = ~c.failed & (c.output_tokens > 0)
    shape, scale, method = fit_gamma(np.diff(c.arrival_s))

    def length(x: np.ndarray) -> LengthDist:
        max_tokens = int(x.max())
        if length_kind == "zipf":
            return LengthDist("zipf", zipf_a=fit_zipf(x, max_tokens), max_tokens=max_tokens)
        mu, sigma = fit_lognormal(x)
        return LengthDist("lognormal", mu=mu, sigma=sigma, max_tokens=max_tokens)

    fitted = dict(
        gamma_shape=shape,
        gamma_scale=scale,
        prompt=length(c.prompt_tokens[c.prompt_tokens > 0]),
        output=length(c.output_tokens[ok]),
        failure_rate=float(c.failed.mean()),
    )
    if len(c.model_names) == 1 and c.model_names[0]:
        fitted["model"] = c.model_names[0]
    fitted.update(overrides)
    config = SynthConfig(**fitted)
    info = {
        "fitted_to": trace.source,
        "num_requests": len(c),
        "gamma_method": method,
        "rate_req_s": 1.0 / (shape * scale),
        "interarrival_cv": 1.0 / math.sqrt(shape),
        "config": asdict(config),
    }
    return config, info


# ---------------------------------------------------------------------------------------------
# Writing


def write_burstgpt_csv(trace: Trace, path: str | os.PathLike, log_type: str | None = None) -> None:
    """Writes the 6-column BurstGPT CSV (timestamps with millisecond precision)."""
    c = trace.columns
    log_type = log_type or trace.meta.get("log_type", "Conversation log")
    for text, what in ((log_type, "log type"), *((m, "model name") for m in c.model_names)):
        if "," in text or "\n" in text:
            raise ValueError(f"{what} {text!r} cannot be written to CSV (contains a comma or newline)")
    models = [m or "unknown" for m in c.model_names]
    # Failed rows are written with 0 response tokens, the way BurstGPT marks them.
    output = np.where(c.failed, 0, c.output_tokens)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(",".join(("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")) + "\n")
        f.writelines(
            f"{t:.3f},{models[m]},{p},{o},{p + o},{log_type}\n"
            for t, m, p, o in zip(c.arrival_s.tolist(), c.model_index.tolist(), c.prompt_tokens.tolist(), output.tolist())
        )
