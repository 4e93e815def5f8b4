"""Grammar-constrained decoding in the engine: xgrammar's matcher over the served model's own
vocabulary, masks on the packed batch, and the paths that touch a sequence's life (n > 1,
chunked prefill, preemption by recompute, logprobs, seeds, stop strings, max_tokens)."""
import json
import re

import jsonschema
import pytest
import torch

from lenserve import LLM, SamplingParams
from lenserve.engine.structured_output import StructuredOutputSpec
from lenserve.engine.structured_output.xgrammar_backend import GrammarError, XgrammarBackend

from .helpers import check_logprobs_close

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def _run(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    return [outs[f"r{i}"] for i in range(len(prompts))]


def _grammar_accepts(engine, spec, token_ids) -> bool:
    """Every token, in order, is one the grammar allows (a valid answer or a prefix of one)."""
    matcher = engine.structured_output.new_matcher(spec)
    return all(matcher.accept_token(t) for t in token_ids)


def test_backend_caches_and_rejects(llm):
    backend = XgrammarBackend(llm.engine.tokenizer, llm.engine.arch.vocab_size, cache_size=2)
    a, b, c = (StructuredOutputSpec("regex", r) for r in (r"[a-z]+", r"[0-9]+", r"x|y"))
    _, t_a = backend.compile(a)
    _, again = backend.compile(a)
    assert t_a is not None and again is None
    backend.compile(b)
    backend.compile(c)  # evicts a, the least recently used
    assert backend.compile(a)[1] is not None
    assert (backend.cache_stats.hits, backend.cache_stats.misses) == (1, 4)
    with pytest.raises(GrammarError):
        backend.compile(StructuredOutputSpec.json_schema({"type": "no-such-type"}))
    with pytest.raises(GrammarError):
        backend.compile(StructuredOutputSpec("grammar", "root ::= undefined_rule"))


def test_vocabulary_matches_the_models_tokens(llm):
    """The matcher accepts exactly the served tokenizer's encoding of a valid answer, token by token."""
    eng = llm.engine
    matcher = eng.structured_output.new_matcher(StructuredOutputSpec.json_schema(SCHEMA))
    answer = '{"name": "Ann Lee", "age": 42, "tags": ["a", "b"]}'
    for t in eng.tokenizer.encode(answer, add_special_tokens=False):
        assert matcher.accept_token(t), eng.tokenizer.id_to_piece(t)
    assert matcher.accept_token(eng.tokenizer.eos_token_id) and matcher.is_terminated()
    bad = eng.structured_output.new_matcher(StructuredOutputSpec.json_schema(SCHEMA))
    assert not bad.accept_token(eng.tokenizer.encode("[", add_special_tokens=False)[0])


def test_constrained_outputs_with_n_seed_logprobs(llm):
    eng = llm.engine
    prompt = "Describe a person as JSON:"
    params = SamplingParams(max_tokens=60, temperature=0.9, seed=5, n=3, logprobs=2,
                            structured_output=StructuredOutputSpec.json_schema(SCHEMA))
    first = _run(eng, [prompt], params)[0]
    again = _run(eng, [prompt], params)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    for c in first.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        assert _grammar_accepts(eng, params.structured_output, c.token_ids)
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), SCHEMA)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 60


def test_max_tokens_cut_says_length_and_stop_strings_apply(llm):
    eng = llm.engine
    spec = StructuredOutputSpec("regex", r"(ab){40}")
    cut = _run(eng, ["Write:"], SamplingParams(max_tokens=5, temperature=0.0, structured_output=spec))[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5 and re.fullmatch(r"(ab)*a?b?", cut.text)
    stopped = _run(eng, ["Write:"], SamplingParams(max_tokens=40, temperature=0.0, stop=["abab"], structured_output=spec))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text in ("", "ab") and stopped.stop_reason == "abab"


def test_logit_bias_forces_and_bans(llm):
    eng = llm.engine
    x = eng.tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = _run(eng, ["The capital of France is"], SamplingParams(max_tokens=3, temperature=0.0, logit_bias={x: 100.0}))[0]
    assert forced.outputs[0].token_ids == [x, x, x]
    plain = _run(eng, ["The capital of France is"], SamplingParams(max_tokens=1, temperature=0.0))[0].outputs[0].token_ids[0]
    banned = _run(eng, ["The capital of France is"], SamplingParams(max_tokens=1, temperature=0.0, logit_bias={plain: -100.0}))[0]
    assert banned.outputs[0].token_ids[0] != plain
    with pytest.raises(ValueError, match="logit_bias"):
        eng.add_request("bad", "x", SamplingParams(logit_bias={eng.arch.vocab_size: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})


def test_unconstrained_rows_untouched_and_preemption_keeps_grammar(test_prompts):
    """A KV cache too small for everyone forces preemptions by recompute: constrained answers stay
    valid, unconstrained ones equal the same engine's run of them alone."""
    small = LLM(max_num_seqs=8, kv_cache_memory_gb=0.011, enable_prefix_caching=False).engine  # ~60 blocks
    spec = StructuredOutputSpec.json_schema(SCHEMA)
    pool = small.tokenizer.encode("\n\n".join(test_prompts[300:340]))
    prompts = [pool[i * 97 : i * 97 + n] for i, n in enumerate([60, 90, 120, 70, 100, 80])]
    free = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, logprobs=5)
    constrained = SamplingParams(max_tokens=48, temperature=0.0, structured_output=spec)
    for i, p in enumerate(prompts):
        small.add_request(f"r{i}", p, constrained if i % 2 else free)
    outs = {}
    while small.has_unfinished_requests():
        for o in small.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0]
    assert small.scheduler.num_preemptions_total > 0
    for i in range(1, len(prompts), 2):
        c = outs[f"r{i}"]
        assert _grammar_accepts(small, spec, c.token_ids)
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), SCHEMA)
    for i in range(0, len(prompts), 2):
        alone, mixed = _run(small, [prompts[i]], free)[0].outputs[0], outs[f"r{i}"]
        check_logprobs_close(alone.token_ids, alone.logprobs, mixed.token_ids, mixed.logprobs, "alone", "mixed")
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks
    assert not small._matchers


def test_chunked_prefill_then_constrained_decode(test_prompts):
    """A 16-token step budget splits the prompt over several steps; only the step that samples masks."""
    eng = LLM(max_num_seqs=4, max_num_batched_tokens=16, enable_prefix_caching=False).engine
    spec = StructuredOutputSpec.choice(["alpha", "beta", "gamma"])
    prompt = eng.tokenizer.encode(test_prompts[5])[:70]
    out = _run(eng, [prompt], SamplingParams(max_tokens=8, temperature=0.0, structured_output=spec))[0].outputs[0]
    assert out.text in ("alpha", "beta", "gamma") and out.finish_reason == "stop"
    assert eng.num_steps >= 5


def test_bitmask_leaves_other_rows_bit_identical(llm):
    backend = llm.engine.structured_output
    logits = torch.randn(4, llm.engine.arch.vocab_size)
    before = logits.clone()
    matchers = [None, backend.new_matcher(StructuredOutputSpec.choice(["yes", "no"])), None, None]
    backend.apply_bitmask(logits, matchers)
    assert torch.equal(logits[[0, 2, 3]], before[[0, 2, 3]])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    texts = {llm.engine.tokenizer.decode([t]) for t in allowed}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)


def test_hf_byte_fallback_tokenizer(tmp_path):
    """An HF tokenizer.json of Llama-2's kind (sentencepiece BPE: ▁ for spaces, <0xNN> byte
    fallback) is read as such: a schema's answer, encoded by that tokenizer, is accepted. (No
    prefix ▁ is prepended: a model's answer continues its prompt, so it never starts with one.)"""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, trainers

    from lenserve.engine.tokenizer import Tokenizer
    from lenserve.engine.structured_output.xgrammar_backend import tokenizer_info

    hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    hf.normalizer = normalizers.Replace(" ", "▁")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    hf.train_from_iterator(['{"name": "Ann", "age": 42}', "the quick brown fox jumps over the lazy dog"] * 50, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    tok = Tokenizer.from_hf_dir(str(tmp_path))
    info = tokenizer_info(tok, tok.vocab_size + 8)  # a padded embedding, as Qwen2's
    assert info.vocab_type.name == "BYTE_FALLBACK" and info.stop_token_ids == [tok.eos_token_id]
    backend = XgrammarBackend(tok, tok.vocab_size + 8)
    matcher = backend.new_matcher(StructuredOutputSpec.json_schema(SCHEMA))
    ids = tok.encode('{"name": "Zoë", "age": 7, "tags": ["a"]}', add_special_tokens=False)
    assert "<0xC3>" in [tok.hf.id_to_token(t) for t in ids]  # "ë" is not in the vocabulary: byte fallback
    assert all(matcher.accept_token(t) for t in ids) and matcher.accept_token(tok.eos_token_id)
