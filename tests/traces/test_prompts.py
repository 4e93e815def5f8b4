import asyncio

import pytest

from lenserve.traces.fake_server import fake_tokenize
from lenserve.traces.prompts import ExactPromptBuilder, LocalTokenCounter, NaturalPrompts, count_word_tokens

SIZES = [1, 2, 3, 4, 5, 9, 64, 150, 513, 2000, 30000]


class FakeCounter:
    """The fake server's tokenizer (BOS + ceil(len/4) per word), with a call counter."""

    def __init__(self, tokenize=fake_tokenize):
        self.num_calls = 0
        self._tokenize = tokenize

    async def tokenize(self, texts):
        self.num_calls += len(texts)
        return [self._tokenize(t) for t in texts]


def test_exact_prompts_have_exactly_the_requested_tokens():
    counter = FakeCounter()
    builder = asyncio.run(ExactPromptBuilder.create(counter, seed=7))
    assert builder.base_tokens == 1  # the fake BOS
    assert counter.num_calls < 40  # words counted in batches, not one call each
    for i, n in enumerate(SIZES[1:]):  # 1 token is below BOS + one word
        text, count = builder.build(i, n)
        assert count == n and len(fake_tokenize(text)) == n
    assert builder.build(0, 150) == builder.build(0, 150)  # deterministic
    a, b = builder.build(1, 150)[0], builder.build(2, 150)[0]
    assert a.split()[:4] != b.split()[:4]  # distinct prefixes: no shared prefix-cache hits


def test_prompt_below_the_minimum_is_the_smallest_possible():
    builder = asyncio.run(ExactPromptBuilder.create(FakeCounter()))
    text, count = builder.build(0, 0)
    assert count == 2 and len(fake_tokenize(text)) == 2  # BOS + one word


def test_batches_that_do_not_split_fall_back_to_one_call_per_word():
    def merging(text):  # a tokenizer that swallows the separator: batches cannot be split
        return fake_tokenize(text.replace(" |", ""))

    counter = FakeCounter(merging)
    counts, base = asyncio.run(count_word_tokens(counter, ["alpha", "be", "gammadelta"]))
    assert counts == {"alpha": 2, "be": 1, "gammadelta": 3} and base == 1
    assert counter.num_calls == 3 + 1 + 3


def _smollm2_tokenizer_json(tmp_path_factory):
    try:
        from lenserve.engine.loader_gguf import find_embedded_gguf, read_gguf_fields
        from lenserve.engine.tokenizer import Tokenizer

        path = find_embedded_gguf()
    except Exception as e:  # the embedded model is optional in a checkout
        pytest.skip(f"embedded SmolLM2 GGUF not available: {e}")
    tokenizer = Tokenizer.from_gguf_fields(read_gguf_fields(path))
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.hf.save(str(out))
    return out


@pytest.mark.slow
def test_exact_prompts_with_the_embedded_model_tokenizer(tmp_path_factory):
    """The additivity the builder relies on holds for SmolLM2's real byte-level BPE."""
    path = _smollm2_tokenizer_json(tmp_path_factory)
    counter = LocalTokenCounter(path)
    builder = asyncio.run(ExactPromptBuilder.create(counter))
    texts = [builder.build(i, n) for i, n in enumerate(SIZES)]
    counted = asyncio.run(counter.tokenize([t for t, _ in texts]))
    assert [len(ids) for ids in counted] == [n for _, n in texts] == SIZES


def test_natural_prompts_cycle_in_a_seeded_order(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(f'{{"id": {i}, "prompt": "prompt {i}"}}\n' for i in range(5)))
    prompts = NaturalPrompts(path, seed=1)
    first = [prompts.prompt(i) for i in range(5)]
    assert sorted(first) == [f"prompt {i}" for i in range(5)]
    assert [prompts.prompt(i) for i in range(5, 10)] == first
    assert NaturalPrompts(path, seed=1).prompt(3) == first[3]


def test_natural_prompts_default_to_the_shipped_set():
    prompts = NaturalPrompts()
    assert len(prompts.prompts) == 8762 and prompts.prompt(0)


def test_block_prompts_share_exactly_their_common_leading_blocks():
    """Equal block ids give equal tokens: two prompts agree token for token as far as their leading
    ids agree (the server's prefix cache hits that far) and differ right after."""
    builder = asyncio.run(ExactPromptBuilder.create(FakeCounter(), seed=3))
    a, na = builder.build_blocks((7, 8, 9, 10), 1 + 64, 16)
    b, nb = builder.build_blocks((7, 8, 11, 12, 13), 1 + 70, 16)
    ta, tb = fake_tokenize(a), fake_tokenize(b)
    assert (len(ta), na) == (65, 65) and (len(tb), nb) == (71, 71)
    shared = next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y)
    assert 1 + 32 <= shared < 1 + 32 + 4  # BOS + two blocks, then (almost surely) a difference
    assert builder.build_blocks((7, 8), 1 + 20, 16)[0] == builder.build_blocks((7, 8), 1 + 20, 16)[0]
    c, nc = builder.build_blocks((7,), 1 + 40, 16)  # longer than its blocks: padded
    assert nc == 41 and len(fake_tokenize(c)) == 41 and fake_tokenize(c)[:17] == ta[:17]
