"""The engine: requests in, token deltas out, one scheduling step at a time.

    step():  out = scheduler.schedule()
             logits = model_runner.execute(out)     # packed tokens, one AttentionMetadata
             tokens = sampler(logits, params)
             finished = scheduler.update(out, tokens)
             detokenize, check stop strings, emit deltas and statistics
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from lenserve.config import EngineConfig, resolve_target_itl_s
from lenserve.engine._ext import has_op
from lenserve.engine import quant
from lenserve.engine.attention import backend_for
from lenserve.engine.cpu_threads import run_in_fresh_thread
from lenserve.engine.cuda_graph import graph_batch_sizes
from lenserve.engine.detokenizer import IncrementalDetokenizer
from lenserve.engine.kv_cache import KVCache, kv_bytes_per_block
from lenserve.engine.loader_hf import load_model_files
from lenserve.engine.memory import KVBudget, num_kv_blocks, profile_decode_peak, profile_forward_peak
from lenserve.engine.model import LlamaModel
from lenserve.engine.model_runner import ModelRunner
from lenserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lenserve.engine.sampler import Sampler
from lenserve.engine.sampling_params import SamplingParams
from lenserve.engine.stats import FinishedRequestStats, IterationStats
from lenserve.engine.structured_output.xgrammar_backend import XgrammarBackend
from lenserve.predictor.types import LengthPrediction
from lenserve.scheduler import BlockManager, Scheduler, Sequence, SequenceStatus
from lenserve.scheduler.cost_model import OnlineCostModel, load_default

LIFETIME_REPORT_EVERY = 8  # refits (every 16 steps, and without an ITL target no sooner than REFIT_MIN_S apart)
# Measured step time between two refits of the online cost model, at least (OnlineCostModel's
# refit_min_s), when no ITL target sizes the budgets with it: at batch 1 (~4 ms steps) a refit
# every ~60 steps instead of 16.
REFIT_MIN_S = 0.25

logger = logging.getLogger("lenserve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_GB = 4.0


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    outputs: list[CompletionOutput]
    arrival_time: float
    prediction: LengthPrediction | None
    error: str | None = None
    refined: LengthPrediction | None = None  # the length probe's, at the end of the prefill
    cancelled: set[int] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def _resolve_weights_dtype(config: EngineConfig, on_cpu: bool) -> str:
    gguf = config.model is None or config.model.endswith(".gguf")
    kernels = has_op("quant_linear", "cpu")
    if config.weights_dtype == "auto":
        # A GGUF on CPU is served as its file stores it (native): side by side on a 2-core EPYC
        # (bench_peers), one stream decodes ~2.3x faster than with fp32-dequantized weights, 8
        # streams 1.2x, 32 streams on par, prefill on par, in 0.38x the memory.
        return "native" if on_cpu and gguf and kernels else "fp32"
    if config.weights_dtype in ("fp16", "native"):
        if not on_cpu:
            raise ValueError(f"weights_dtype {config.weights_dtype!r} is for CPU; on CUDA choose --dtype")
        if not kernels:
            raise ValueError(f"weights_dtype {config.weights_dtype!r} needs lenserve._C's quant_linear (not built)")
        if config.weights_dtype == "native" and not gguf:
            raise ValueError("weights_dtype 'native' keeps a GGUF file's encoding; this model is an HF checkpoint (use fp16 or fp32)")
    return config.weights_dtype


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        # Loading runs parallel CPU work (weight packing, the warm-up forward): in a thread of its
        # own, so that the thread that later steps is the process's only OpenMP team (cpu_threads.py).
        run_in_fresh_thread(self._init, config)

    def _init(self, config: EngineConfig | None) -> None:
        self.config = config = config or EngineConfig()
        self.device = _resolve_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        on_cpu = self.device.type == "cpu"
        self.dtype = _DTYPES[config.dtype] if config.dtype != "auto" else (torch.float32 if on_cpu else torch.bfloat16)
        if config.kv_cache_dtype != "auto":
            kv_dtype = _DTYPES[config.kv_cache_dtype]
        else:
            kv_dtype = torch.float16 if on_cpu else self.dtype

        self.weights_dtype = _resolve_weights_dtype(config, on_cpu)
        t0 = time.monotonic()
        arch, weights, self.tokenizer, self.model_path = load_model_files(
            config.model, self.weights_dtype == "native", self.device, self.dtype
        )
        self.arch = arch
        self.model = LlamaModel.from_weights(
            arch, weights, self.dtype, self.device, config.attention_backend, weights_dtype=self.weights_dtype
        )
        self.model_name = arch.name
        self.max_model_len = min(config.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
        config.scheduler.max_model_len = self.max_model_len

        per_block = kv_bytes_per_block(arch, config.block_size, kv_dtype)
        # CUDA graphs replay decode steps on our kernels (the torch decode path reads the context
        # lengths back on the host, which a graph cannot hold).
        decode_backend = backend_for(config.attention_backend, self.device, self.dtype, arch.head_dim)
        self.use_cuda_graphs = (
            not on_cpu and not config.enforce_eager and config.attention == "packed" and decode_backend in ("kernels", "flash-attn")
        )
        self.kv_budget: KVBudget | None = None
        if on_cpu:
            num_blocks = max(int((config.kv_cache_memory_gb or DEFAULT_CPU_KV_GB) * 2**30) // per_block, 1)
        elif config.kv_cache_memory_gb is not None:
            num_blocks = max(int(config.kv_cache_memory_gb * 2**30) // per_block, 1)
        else:
            num_blocks = self._cuda_kv_blocks(per_block, kv_dtype)
        self.kv_cache = KVCache(arch, num_blocks, config.block_size, kv_dtype, self.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        config.scheduler.target_itl_s = resolve_target_itl_s(config.target_itl_ms, self.device.type)
        # Step times measured here refit the cost model the token budget is chosen with; on CPU the
        # shipped model (measured on another CPU, maybe 2-3x off) is the prior until they do. Without
        # a target no budget depends on it (it prices steps for the metrics and for simulation):
        # refits then also wait REFIT_MIN_S.
        self.cost_model = OnlineCostModel(prior=load_default() if on_cpu else None,
                                          refit_min_s=REFIT_MIN_S if config.scheduler.target_itl_s is None else 0.0)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, cost_model=self.cost_model)
        self.runner = ModelRunner(self.model, self.kv_cache, padded=config.attention == "padded")
        if self.use_cuda_graphs:
            self.runner.enable_decode_graphs(config.scheduler.max_num_seqs, self.max_model_len)
        self.sampler = Sampler(arch.vocab_size)
        self.structured_output = XgrammarBackend(self.tokenizer, arch.vocab_size)
        # One grammar matcher per constrained sequence. Preemption recomputes the KV cache but keeps
        # the sequence's tokens, so a matcher's state stays valid across it: nothing to roll back.
        self._matchers: dict = {}
        self.requests: dict[str, _RequestState] = {}
        self._seq_to_request: dict[str, tuple[str, int]] = {}
        self.last_stats = IterationStats()
        self._pending_finished: list[FinishedRequestStats] = []
        self.num_steps = 0
        # Reads the residual stream at the end of each prompt's prefill (predictor/probe.py): a
        # HiddenStateProbe refines the sequence's length prediction; None reads nothing.
        self.length_probe = None
        logger.info(
            "loaded %s (%d layers, %.0f MB %s, %s weights%s) on %s in %.1fs; KV cache %d blocks x %d tokens (%.2f GiB %s)",
            self.model_name, arch.num_layers, self.model.num_bytes() / 1e6, self.dtype, self.weights_dtype,
            f", {quant.kernel_isa()} integer kernels" if self.weights_dtype == "native" and self.device.type == "cpu" else "",
            self.device,
            time.monotonic() - t0, num_blocks, config.block_size, self.kv_cache.num_bytes / 2**30, kv_dtype,
        )

    def _cuda_kv_blocks(self, per_block: int, kv_dtype: torch.dtype) -> int:
        """Profile first (a forward at max_num_batched_tokens; an eager decode at the largest graph
        size), then size the cache from what gpu_memory_utilization leaves."""
        cfg, sched = self.config, self.config.scheduler
        dev = self.device
        torch.cuda.empty_cache()
        peak = profile_forward_peak(self.model, sched.max_num_batched_tokens, self.max_model_len, sched.max_num_seqs,
                                    cfg.block_size, kv_dtype)
        graph_bytes = 0
        if self.use_cuda_graphs:
            graph_bytes = profile_decode_peak(self.model, graph_batch_sizes(sched.max_num_seqs)[-1], self.max_model_len,
                                              cfg.block_size, kv_dtype)
        free, total = torch.cuda.mem_get_info(dev)
        self.kv_budget = KVBudget(total, free, cfg.gpu_memory_utilization, peak, graph_bytes)
        max_useful = sched.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        num_blocks = num_kv_blocks(self.kv_budget, per_block, max_useful)
        logger.info("KV cache on %s: %d blocks (%s)", dev, num_blocks, self.kv_budget.describe())
        return num_blocks

    def set_length_probe(self, probe) -> None:
        """Refine each sequence's length prediction from the served model's own state when its
        prompt's prefill completes (a HiddenStateProbe fitted on this model; None: stop)."""
        if probe is not None:
            probe.check_model(self.model_name, self.arch.num_layers, self.arch.hidden_size)
        self.length_probe = probe

    def _read_prompt_states(self, sampling_seqs: list[Sequence], states: torch.Tensor) -> None:
        first = [j for j, s in enumerate(sampling_seqs) if s.num_output_tokens == 0]
        seqs = [sampling_seqs[j] for j in first]
        request_ids = [self._seq_to_request[s.request_id][0] for s in seqs]
        preds = self.length_probe.read(request_ids, states[first].cpu().numpy(), [s.max_tokens for s in seqs])
        for seq, rid, pred in zip(seqs, request_ids, preds or ()):
            self.scheduler.refine(seq, pred)
            self.requests[rid].refined = pred

    # ---- requests ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Seq[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        return None, self.check_token_ids(prompt)

    def check_token_ids(self, token_ids: Seq[int]) -> list[int]:
        ids = list(token_ids)
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.arch.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}")
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        prediction: LengthPrediction | None = None,
        priority: int = 0,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queues a request. Raises ValueError (naming the field and limit) for bad input."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"duplicate request_id {request_id!r}")
        if prompt_token_ids is None:
            text, ids = self.encode_prompt(prompt)
        else:
            text, ids = (prompt if isinstance(prompt, str) else None), self.check_token_ids(prompt_token_ids)
        if not ids:
            raise ValueError("prompt must not be empty (it encodes to no tokens)")
        max_tokens = params.check_against_model(self.arch.vocab_size, len(ids), self.max_model_len)
        needed = self.block_manager.num_blocks_for(len(ids) + 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt of {len(ids)} tokens does not fit the KV cache ({self.block_manager.num_blocks} blocks of "
                f"{self.block_manager.block_size})"
            )
        arrival = time.monotonic() if arrival_time is None else arrival_time
        tok = self.tokenizer
        stop_ids = set(params.stop_token_ids) | set(tok.extra_eos_token_ids if not params.ignore_eos else ())
        seqs, detoks, outs = [], [], []
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seq = Sequence(
                seq_id,
                ids,
                max_tokens=max_tokens,
                arrival_time=arrival,
                eos_token_id=tok.eos_token_id,
                stop_token_ids=stop_ids,
                ignore_eos=params.ignore_eos,
                min_tokens=params.min_tokens,
                priority=priority,
                prediction=prediction,
                params=params,
                group_id=request_id if params.n > 1 else None,
            )
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(tok, params.stop, params.include_stop_str_in_output, params.skip_special_tokens))
            outs.append(CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None))
        if params.structured_output is not None:
            for seq in seqs:
                self._matchers[seq.request_id] = self.structured_output.new_matcher(params.structured_output)
        for i, seq in enumerate(seqs):
            self.scheduler.add(seq)
            self._seq_to_request[seq.request_id] = (request_id, i)
        self.requests[request_id] = _RequestState(request_id, text, ids, params, seqs, detoks, outs, arrival, prediction)

    def abort_request(self, request_id: str, reason: str = "abort") -> bool:
        """Aborts every sequence of a request and frees its blocks. Returns False if it was unknown."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        self._pending_finished.append(self._finished_stats(state, reason))
        for seq in state.seqs:
            self.scheduler.abort(seq.request_id)
            self._forget(seq.request_id)
            self._seq_to_request.pop(seq.request_id, None)
        return True

    def finish_completion(self, request_id: str, index: int) -> RequestOutput | None:
        """Ends one completion of a request now, as a caller's stop (finish reason "stop"), and frees
        its blocks; the request's other completions go on. Returns the request's final output when
        that was its last unfinished completion (the request is then gone), else None. Raises
        KeyError for an unknown request or index. Call it between steps."""
        state = self.requests[request_id]
        if not 0 <= index < len(state.seqs):
            raise KeyError(f"request {request_id!r} has no completion {index}")
        seq, comp = state.seqs[index], state.outputs[index]
        if seq.is_finished:
            return None
        self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        self._forget(seq.request_id)
        comp.delta_text += state.detokenizers[index].flush()
        comp.text = state.detokenizers[index].emitted_text
        comp.finish_reason = seq.status.finish_reason
        if not state.finished:
            return None
        result = self._emit(state)
        for s in state.seqs:
            self._seq_to_request.pop(s.request_id, None)
        self._pending_finished.append(self._finished_stats(state))
        del self.requests[request_id]
        return result

    def _forget(self, seq_id: str) -> None:
        self.sampler.forget(seq_id)
        self._matchers.pop(seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    # ---- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduling step; returns a delta for every request that changed."""
        t0 = time.monotonic()
        out = self.scheduler.schedule()
        stats = IterationStats(num_preemptions=len(out.preempted), finished=self.take_pending_finished())
        if out.is_empty:
            stats.scheduler = self.scheduler.stats()
            self.last_stats = stats
            return []
        probe = self.length_probe
        logits, sampling = self.runner.execute(out, probe.layers if probe is not None else None)
        sampling_seqs = [out.seqs[i] for i in sampling]
        if self.runner.last_states is not None:
            self._read_prompt_states(sampling_seqs, self.runner.last_states)
        offsets = [self._seq_to_request[s.request_id][1] for s in sampling_seqs]
        matchers = [self._matchers.get(s.request_id) for s in sampling_seqs] if self._matchers else []
        if any(m is not None for m in matchers):
            t_mask = time.perf_counter()
            self.structured_output.apply_bitmask(logits, matchers)
            stats.bitmask_time_s = time.perf_counter() - t_mask
        sampled = self.sampler(logits, sampling_seqs, offsets)
        by_seq = {s.request_id: (tok, lp) for s, tok, lp in zip(sampling_seqs, sampled.token_ids, sampled.logprobs)}
        prev_token_time = {s.request_id: s.last_token_time for s in sampling_seqs}
        num_prompt_tokens = sum(
            max(0, min(n, s.num_prompt_tokens - s.num_computed_tokens)) for s, n in zip(out.seqs, out.num_new_tokens)
        )
        self.scheduler.update(out, {k: v[0] for k, v in by_seq.items()})
        now = time.monotonic()
        target = self.scheduler.config.target_itl_s

        changed: dict[str, _RequestState] = {}
        for j, seq in enumerate(sampling_seqs):
            rid, idx = self._seq_to_request[seq.request_id]
            state = self.requests[rid]
            comp = state.outputs[idx]
            tok, lp = by_seq[seq.request_id]
            comp.token_ids.append(tok)
            comp.delta_token_ids.append(tok)
            if lp is not None:
                comp.logprobs.append(lp)
                if comp.delta_logprobs is None:
                    comp.delta_logprobs = []
                comp.delta_logprobs.append(lp)
            matcher = matchers[j] if matchers else None
            if matcher is not None and not matcher.is_terminated() and not matcher.accept_token(tok) and not seq.is_finished:
                # Only a token the mask could not forbid gets here (min_tokens banning the end the
                # grammar requires): the constrained answer is over.
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
            detok = state.detokenizers[idx]
            comp.delta_text += detok.add_token(tok)
            if detok.stop_hit is not None and not seq.is_finished:
                seq.stop_reason = detok.stop_hit
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
            if seq.is_finished:
                comp.delta_text += detok.flush()
                comp.finish_reason = seq.status.finish_reason
                comp.stop_reason = seq.stop_reason
                self._forget(seq.request_id)
            comp.text = detok.emitted_text
            if seq.num_output_tokens == 1:
                stats.time_to_first_tokens_s.append(now - seq.arrival_time)
            elif prev_token_time[seq.request_id] is not None:
                gap = now - prev_token_time[seq.request_id]
                stats.inter_token_latencies_s.append(gap)
                if target is not None and gap > target:
                    stats.num_itl_target_misses += 1
            changed[rid] = state

        results = []
        for rid, state in changed.items():
            results.append(self._emit(state))
            if state.finished:
                for seq in state.seqs:
                    self._seq_to_request.pop(seq.request_id, None)
                stats.finished.append(self._finished_stats(state))
                del self.requests[rid]

        # The whole step, detokenizing and emitting included: what a stream waits between tokens.
        stats.step_time_s = time.monotonic() - t0
        refits = self.cost_model.num_refits
        stats.step_time_over_predicted = self.scheduler.record_step_time(stats.step_time_s)
        if self.cost_model.num_refits != refits:
            stats.cost_model = self.cost_model.terms()
            # The lifetime fit (every step so far, for the metrics) at the first refit and every
            # LIFETIME_REPORT_EVERY-th after: solved at every refit it was ~1.5% of a batch-1
            # decode step, for gauges scraped every few seconds.
            if (self.cost_model.num_refits - 1) % LIFETIME_REPORT_EVERY == 0:
                stats.cost_model_lifetime, stats.cost_model_lifetime_scatter = self.cost_model.lifetime_report()
        stats.token_budget = self.scheduler.last_token_budget
        stats.num_prompt_tokens = num_prompt_tokens
        stats.num_generation_tokens = len(sampling_seqs)
        stats.num_batched_tokens = out.num_batched_tokens
        stats.padding_ratio = self.runner.last_padding_ratio
        stats.scheduler = self.scheduler.stats()
        self.last_stats = stats
        self.num_steps += 1
        return results

    def _emit(self, state: _RequestState) -> RequestOutput:
        outs = []
        for comp in state.outputs:
            outs.append(CompletionOutput(
                index=comp.index,
                text=comp.text,
                token_ids=list(comp.token_ids),
                logprobs=list(comp.logprobs) if comp.logprobs is not None else None,
                finish_reason=comp.finish_reason,
                stop_reason=comp.stop_reason,
                delta_text=comp.delta_text,
                delta_token_ids=comp.delta_token_ids,
                delta_logprobs=comp.delta_logprobs,
            ))
            comp.delta_text, comp.delta_token_ids, comp.delta_logprobs = "", [], None
        seq0 = state.seqs[0]
        metrics = RequestMetrics(
            arrival_time=state.arrival_time,
            first_scheduled_time=seq0.first_scheduled_time,
            first_token_time=min((s.first_token_time for s in state.seqs if s.first_token_time), default=None),
            finished_time=max((s.finished_time or 0 for s in state.seqs), default=None) if state.finished else None,
            num_prompt_tokens=len(state.prompt_token_ids),
            num_cached_tokens=seq0.num_cached_tokens,
            num_generation_tokens=sum(len(o.token_ids) for o in state.outputs),
            num_preemptions=sum(s.num_preemptions for s in state.seqs),
        )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outs,
            finished=state.finished,
            metrics=metrics,
            prediction=state.prediction,
            error=state.error,
        )

    @staticmethod
    def _finished_stats(state: _RequestState, reason: str | None = None) -> FinishedRequestStats:
        """One record per request (n completions together): timing from its first sequence."""
        now = time.monotonic()
        seq = state.seqs[0]
        end = max((s.finished_time or now for s in state.seqs), default=now)
        sched = seq.first_scheduled_time or end
        firsts = [s.first_token_time for s in state.seqs if s.first_token_time]
        first = min(firsts) if firsts else None
        return FinishedRequestStats(
            finish_reason=reason or state.outputs[0].finish_reason or "abort",
            e2e_s=end - state.arrival_time,
            queue_s=sched - state.arrival_time,
            prefill_s=(first or end) - sched,
            decode_s=end - (first or end),
            ttft_s=(first - state.arrival_time) if first else None,
            num_prompt_tokens=len(state.prompt_token_ids),
            num_generation_tokens=sum(s.num_output_tokens for s in state.seqs),
            predicted_tokens=state.prediction.mean if state.prediction else None,
            bucket=state.prediction.bucket if state.prediction else None,
            refined_tokens=state.refined.mean if state.refined else None,
        )

    def fail_requests(self, request_ids: list[str], message: str) -> list[RequestOutput]:
        """Ends requests with an error (an engine fault hit them); frees their blocks."""
        results = []
        for rid in request_ids:
            state = self.requests.get(rid)
            if state is None:
                continue
            state.error = message
            for comp in state.outputs:
                if comp.finish_reason is None:
                    comp.finish_reason = "abort"
            self.abort_request(rid, reason="error")
            results.append(self._emit(state))
        return results

    def take_pending_finished(self) -> list[FinishedRequestStats]:
        """Records of requests that ended outside a step (aborts, errors) since the last call."""
        pending, self._pending_finished = self._pending_finished, []
        return pending

    def generate_all(self) -> None:
        while self.has_unfinished_requests():
            self.step()

    def stats(self) -> IterationStats:
        return self.last_stats
