"""Prometheus metrics, vLLM's names under `lenserve:`. The only module that touches prometheus objects.

The engine emits IterationStats dataclasses each step (on its own thread); `record_iteration`
turns them into counters, gauges and histograms. prometheus_client is thread-safe.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from lenserve.engine.stats import IterationStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
_COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MASK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# measured / predicted step time: 2^(1/8) apart (9%) from 0.25 to 4, fine enough that a simulation
# replaying the scatter (`lenserve simulate --from-server`) sees its tail
_STEP_RATIO_BUCKETS = tuple(round(2 ** (k / 8), 4) for k in range(-16, 17))
_RATIO_BUCKETS = (0.125, 0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0)


class Metrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None, extra_labels: dict[str, str] | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.labels = {"model_name": model_name, **(extra_labels or {})}
        names = list(self.labels)
        r = self.registry

        def gauge(name, doc, extra=()):
            return Gauge(f"lenserve:{name}", doc, names + list(extra), registry=r)

        def counter(name, doc, extra=()):
            return Counter(f"lenserve:{name}", doc, names + list(extra), registry=r)

        def hist(name, doc, buckets):
            return Histogram(f"lenserve:{name}", doc, names, buckets=buckets, registry=r)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = 100%)")
        self.kv_cache_free_blocks = gauge("kv_cache_free_blocks", "Free KV-cache blocks (cached-but-unused included)")
        self.kv_cache_total_blocks = gauge("kv_cache_total_blocks", "KV-cache blocks in all")
        self.batch_padding_ratio = gauge("batch_padding_ratio", "Padded rows / rows in the last forward (0 when packed)")
        self.num_preemptions = counter("num_preemptions_total", "Sequences preempted (recomputed later)")
        self.prefix_cache_queries = counter("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache")
        self.prefix_cache_hits = counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache")
        self.num_cached_blocks = gauge("prefix_cache_blocks", "KV-cache blocks holding a cached prefix (in use or free)")
        self._l(self.prefix_cache_queries)  # scraped as 0 before the first lookup
        self._l(self.prefix_cache_hits)
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens computed")
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated")
        self.request_success = counter("request_success_total", "Requests finished, by finish reason", ["finished_reason"])
        self.request_admitted = counter("request_admitted_total", "Requests accepted into the engine (per prompt)")
        self.request_rejected = counter("request_rejected_total", "Requests refused before running, by reason", ["reason"])
        self.request_bucket = counter("request_bucket_total", "Requests by predicted-length bucket", ["bucket"])
        self.ttft = hist("time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens", _ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Request latency, arrival to finish", _LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time waiting before the first schedule", _LATENCY_BUCKETS)
        self.prefill_time = hist("request_prefill_time_seconds", "First schedule to first token", _LATENCY_BUCKETS)
        self.decode_time = hist("request_decode_time_seconds", "First token to finish", _LATENCY_BUCKETS)
        self.step_token_budget = gauge("step_token_budget", "Token budget of the latest engine step (max_num_batched_tokens, or sized by the ITL target)")
        self.step_duration = hist("step_duration_seconds", "Duration of an engine step (schedule, forward, sample, emit)", _STEP_BUCKETS)
        self.itl_target_miss = counter("itl_target_miss_total", "Inter-token gaps longer than the scheduler's ITL target")
        self.cost_model = gauge("step_cost_model_seconds",
                                "The engine's step cost model, refitted from measured steps: seconds per step (step_base_s), "
                                "per token, per sampled sequence, per prefill query-key pair, per decode context token",
                                ["term"])
        self.cost_model_lifetime = gauge("step_cost_model_lifetime_seconds",
                                         "The step cost model fitted over every step since start (terms as step_cost_model_seconds): "
                                         "the server's steps over its whole run, for simulating it on other traffic",
                                         ["term"])
        self.cost_model_lifetime_scatter = gauge(
            "step_time_over_lifetime_model",
            "The lifetime cost model's measured over predicted step time at quantiles, over a uniform sample of the "
            "steps it was fitted on: the scatter a simulation running that model draws from",
            ["quantile"])
        self.step_time_over_predicted = hist(
            "step_time_over_predicted", "Measured / predicted duration of an engine step, under the cost model the scheduler sized it with",
            _STEP_RATIO_BUCKETS)
        self.iteration_tokens = hist("iteration_tokens_total", "Tokens per engine step", _TOKEN_BUCKETS + (16384,))
        self.request_prompt_tokens = hist("request_prompt_tokens", "Prompt tokens per request", _TOKEN_BUCKETS)
        self.request_generation_tokens = hist("request_generation_tokens", "Generated tokens per request", _TOKEN_BUCKETS)
        self.prediction_error_ratio = hist(
            "request_predicted_length_error_ratio", "Predicted / actual response length per finished request", _RATIO_BUCKETS
        )
        self.refined_error_ratio = hist(
            "request_refined_length_error_ratio",
            "Length probe's predicted / actual response length per finished request (read at the end of the prefill)",
            _RATIO_BUCKETS,
        )
        self.num_refinements = counter("length_refinements_total", "Predictions refined by the length probe after a prefill")
        self._l(self.itl_target_miss)  # scraped as 0 before the first miss
        self.structured_output_requests = counter(
            "structured_output_requests_total", "Requests with a structured output constraint, by kind (json, regex, tool, ...)", ["kind"]
        )
        self.grammar_cache_lookups = counter("grammar_cache_lookups_total", "Grammar cache lookups, by result (hit, miss)", ["result"])
        self.grammar_compile_time = hist("grammar_compile_seconds", "Time to compile one grammar (cache misses)", _COMPILE_BUCKETS)
        self.bitmask_time = hist(
            "structured_output_bitmask_seconds", "Time per engine step filling and applying the grammar token bitmask", _MASK_BUCKETS
        )
        self._last_preemptions_total = 0
        self._last_refinements_total = 0
        self._last_prefix_queries_total = 0
        self._last_prefix_hits_total = 0

    def _l(self, metric, **extra):
        return metric.labels(**self.labels, **extra)

    def record_iteration(self, stats: IterationStats) -> None:
        s = stats.scheduler
        self._l(self.num_requests_running).set(s.num_running)
        self._l(self.num_requests_waiting).set(s.num_waiting)
        self._l(self.kv_cache_usage_perc).set(s.kv_cache_usage)
        self._l(self.kv_cache_free_blocks).set(s.num_free_blocks)
        self._l(self.kv_cache_total_blocks).set(s.num_total_blocks)
        self._l(self.batch_padding_ratio).set(stats.padding_ratio)
        if s.num_preemptions_total > self._last_preemptions_total:
            self._l(self.num_preemptions).inc(s.num_preemptions_total - self._last_preemptions_total)
            self._last_preemptions_total = s.num_preemptions_total
        if s.prefix_cache_queries_total > self._last_prefix_queries_total:
            self._l(self.prefix_cache_queries).inc(s.prefix_cache_queries_total - self._last_prefix_queries_total)
            self._last_prefix_queries_total = s.prefix_cache_queries_total
        if s.prefix_cache_hits_total > self._last_prefix_hits_total:
            self._l(self.prefix_cache_hits).inc(s.prefix_cache_hits_total - self._last_prefix_hits_total)
            self._last_prefix_hits_total = s.prefix_cache_hits_total
        self._l(self.num_cached_blocks).set(s.num_cached_blocks)
        if s.num_refinements_total > self._last_refinements_total:
            self._l(self.num_refinements).inc(s.num_refinements_total - self._last_refinements_total)
            self._last_refinements_total = s.num_refinements_total
        if stats.num_prompt_tokens:
            self._l(self.prompt_tokens).inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self._l(self.generation_tokens).inc(stats.num_generation_tokens)
        if stats.num_batched_tokens:
            self._l(self.iteration_tokens).observe(stats.num_batched_tokens)
            self._l(self.step_duration).observe(stats.step_time_s)
            self._l(self.step_token_budget).set(stats.token_budget)
        if stats.step_time_over_predicted is not None:
            self._l(self.step_time_over_predicted).observe(stats.step_time_over_predicted)
        for term, seconds in (stats.cost_model or {}).items():
            self._l(self.cost_model, term=term).set(seconds)
        for term, seconds in (stats.cost_model_lifetime or {}).items():
            self._l(self.cost_model_lifetime, term=term).set(seconds)
        for q, ratio in (stats.cost_model_lifetime_scatter or {}).items():
            self._l(self.cost_model_lifetime_scatter, quantile=f"{q:g}").set(ratio)
        if stats.num_itl_target_misses:
            self._l(self.itl_target_miss).inc(stats.num_itl_target_misses)
        if stats.bitmask_time_s is not None:
            self._l(self.bitmask_time).observe(stats.bitmask_time_s)
        for v in stats.time_to_first_tokens_s:
            self._l(self.ttft).observe(v)
        for v in stats.inter_token_latencies_s:
            self._l(self.itl).observe(v)
        for f in stats.finished:
            self.record_finished(f)

    def record_finished(self, f) -> None:
        self._l(self.request_success, finished_reason=f.finish_reason).inc()
        self._l(self.e2e).observe(f.e2e_s)
        self._l(self.queue_time).observe(f.queue_s)
        self._l(self.prefill_time).observe(f.prefill_s)
        self._l(self.decode_time).observe(f.decode_s)
        self._l(self.request_prompt_tokens).observe(f.num_prompt_tokens)
        self._l(self.request_generation_tokens).observe(f.num_generation_tokens)
        if f.predicted_tokens is not None and f.num_generation_tokens > 0:
            self._l(self.prediction_error_ratio).observe(f.predicted_tokens / f.num_generation_tokens)
        if f.refined_tokens is not None and f.num_generation_tokens > 0:
            self._l(self.refined_error_ratio).observe(f.refined_tokens / f.num_generation_tokens)

    def record_admitted(self, bucket: int | None) -> None:
        self._l(self.request_admitted).inc()
        if bucket is not None:
            self._l(self.request_bucket, bucket=str(bucket)).inc()

    def record_structured_output(self, kind: str) -> None:
        self._l(self.structured_output_requests, kind=kind).inc()

    def record_grammar(self, compile_s: float | None) -> None:
        """One grammar lookup; `compile_s` None when it came from the cache."""
        self._l(self.grammar_cache_lookups, result="hit" if compile_s is None else "miss").inc()
        if compile_s is not None:
            self._l(self.grammar_compile_time).observe(compile_s)

    def record_rejected(self, reason: str) -> None:
        self._l(self.request_rejected, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ServedCostModel(NamedTuple):
    """What a server's /metrics says of its step cost model."""

    model: Any  # CostModel the server schedules with (refitted online, recent steps weigh more), or None before its first refit
    step_noise: Any  # numpy array standing for its steps' measured over predicted times
    lifetime: Any  # CostModel fitted over every step since start, or None
    # numpy array standing for the lifetime model's measured over predicted times (its quantiles;
    # empty from a server that does not report them)
    lifetime_noise: Any = None

    def for_simulation(self) -> tuple:
        """(cost model, step scatter) to simulate this server with: the lifetime fit (the whole
        run's steps describe other traffic best) with its own scatter; the online model's scatter
        with it only from a server that does not report the lifetime fit's."""
        if self.lifetime is not None and self.lifetime_noise is not None and len(self.lifetime_noise):
            return self.lifetime, self.lifetime_noise
        return self.lifetime or self.model, self.step_noise


def served_cost_models(metrics_text: str) -> dict:
    """Per engine ({`replica` label: ServedCostModel}; key None for a single server): each one's
    lenserve:step_cost_model_seconds, lenserve:step_cost_model_lifetime_seconds and
    lenserve:step_time_over_predicted, for a simulation of that server."""
    import numpy as np
    from prometheus_client.parser import text_string_to_metric_families

    from lenserve.scheduler.cost_model import CostModel, samples_from_histogram

    parts: dict = {}

    def of(sample) -> dict:
        return parts.setdefault(sample.labels.get("replica"), {"terms": {}, "lifetime": {}, "buckets": [], "scatter": []})

    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if family.name == "lenserve:step_cost_model_seconds":
                of(s)["terms"][s.labels["term"]] = s.value
            elif family.name == "lenserve:step_cost_model_lifetime_seconds":
                of(s)["lifetime"][s.labels["term"]] = s.value
            elif family.name == "lenserve:step_time_over_lifetime_model":
                of(s)["scatter"].append((float(s.labels["quantile"]), s.value))
            elif family.name == "lenserve:step_time_over_predicted" and s.name.endswith("_bucket"):
                of(s)["buckets"].append((float(s.labels["le"]), s.value))
    out = {}
    for replica, p in parts.items():
        buckets = sorted(p["buckets"])
        out[replica] = ServedCostModel(CostModel(**p["terms"]) if p["terms"] else None,
                                       samples_from_histogram([b for b, _ in buckets], [c for _, c in buckets]),
                                       CostModel(**p["lifetime"]) if p["lifetime"] else None,
                                       np.array([v for _, v in sorted(p["scatter"])]))
    return out


def served_cost_model(metrics_text: str) -> ServedCostModel:
    """served_cost_models of a server with one engine, or of identical replicas pooled: the
    coefficients averaged, the step scatter of all of them together."""
    import numpy as np

    from lenserve.scheduler.cost_model import FEATURES, CostModel

    models = list(served_cost_models(metrics_text).values())
    if len(models) <= 1:
        return models[0] if models else ServedCostModel(None, np.zeros(0), None, np.zeros(0))

    def mean(ms):
        ms = [m for m in ms if m is not None]
        return CostModel(**{k: float(np.mean([getattr(m, k) for m in ms])) for k in FEATURES}) if ms else None

    return ServedCostModel(mean([m.model for m in models]), np.concatenate([m.step_noise for m in models]),
                           mean([m.lifetime for m in models]), np.concatenate([m.lifetime_noise for m in models]))


def fetch_metrics_text(url: str, timeout_s: float = 30.0) -> str:
    """The /metrics text of the server at `url`; ValueError naming the URL when it cannot be read."""
    import httpx

    url = url.rstrip("/")
    try:
        resp = httpx.get(f"{url}/metrics", timeout=timeout_s)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(f"could not read {url}/metrics: {e}") from e
    return resp.text


def fetch_served_cost_model(url: str, timeout_s: float = 30.0) -> ServedCostModel:
    """served_cost_model of the server at `url` (its /metrics); ValueError naming the URL when it
    cannot be read."""
    return served_cost_model(fetch_metrics_text(url, timeout_s))
