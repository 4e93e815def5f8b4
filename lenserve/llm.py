"""The offline API: `LLM().generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from typing import Any, Sequence


from lenserve.config import EngineConfig
from lenserve.engine.llm_engine import LLMEngine
from lenserve.engine.outputs import RequestOutput
from lenserve.engine.sampling_params import SamplingParams

Prompt = str | Sequence[int]
Messages = list[dict[str, Any]]


class LLM:
    """Loads a model (the embedded SmolLM2-135M-Instruct by default) and generates offline.

    Keyword arguments are EngineConfig fields (`max_num_seqs` and `max_num_batched_tokens` go to
    the scheduler).
    """

    _SCHEDULER_KEYS = ("max_num_seqs", "max_num_batched_tokens", "policy", "enable_chunked_prefill", "min_prefill_chunk")

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        sched_kwargs = {k: kwargs.pop(k) for k in self._SCHEDULER_KEYS if k in kwargs}
        config = EngineConfig(model=model, **kwargs)
        for k, v in sched_kwargs.items():
            setattr(config.scheduler, k, v)
        config.scheduler.__post_init__()
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        return self._run([(p, sp, None) for p, sp in zip(prompts, params)], use_tqdm)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template and generates the assistant's reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = sampling_params or SamplingParams()
        jobs = []
        for conv in conversations:
            ids = self.tokenizer.encode_chat(conv)
            jobs.append((self.tokenizer.decode(ids, skip_special_tokens=False), params, ids))
        return self._run(jobs, use_tqdm)

    def _run(self, jobs: list[tuple[Prompt, SamplingParams, list[int] | None]], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        order: list[str] = []
        try:
            for prompt, params, ids in jobs:
                rid = f"offline-{next(self._ids)}"
                engine.add_request(rid, prompt, params, prompt_token_ids=ids)
                order.append(rid)
            results: dict[str, RequestOutput] = {}
            bar = None
            if use_tqdm:  # imported only when asked for: a bare GPU machine has no tqdm
                from tqdm.auto import tqdm

                bar = tqdm(total=len(order), desc="generating")
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            for rid in order:
                engine.abort_request(rid)
            raise
        return [results[rid] for rid in order]
