"""An engine replica's prefix digest (lenserve.server.prefix_digest) on a real engine, no Ray: the
text ids of a served prompt are reported while its KV blocks are cached and dropped once the engine
evicts them; chunk ends map to the exact token on a byte-level BPE tokenizer."""
import time

import pytest

from lenserve.scheduler.routing import text_block_ids
from lenserve.server.prefix_digest import PrefixDigest, chunk_end_tokens


def _words(start: int, n: int) -> str:
    return " ".join(f"t{(start + 7 * i) % 500 + 1}" for i in range(n))


def test_chunk_ends_map_to_the_token_that_completes_them():
    """On the embedded model's tokenizer (byte-level BPE, leading spaces trimmed from the offsets),
    the tokens up to the mapped one decode to the chunk's whole text, one fewer does not."""
    from lenserve.engine.loader_gguf import find_embedded_gguf, read_gguf_fields
    from lenserve.engine.tokenizer import Tokenizer
    from tests.conftest import load_test_prompts

    tok = Tokenizer.from_gguf_fields(read_gguf_fields(find_embedded_gguf()))
    texts = [p for p in load_test_prompts(300) if len(p) >= 128][:60]
    texts.append("naïve café, 漢字 and emoji 🙂🙂 " * 12 + "  two  spaces\n\n  and lines " * 6)
    texts.append(("y" * 63 + "🙂") * 8)  # every chunk ends in a character of several tokens
    checked = 0
    for text in texts:
        ids, offsets = tok.encode_with_offsets(text)
        num_chunks = len(text) // 64
        ends = chunk_end_tokens(offsets, num_chunks, 64)
        assert len(ends) >= num_chunks - 1  # only a last chunk ending in whitespace the tokens trim may go
        for j, t in enumerate(ends):
            want = text[: 64 * (j + 1)]
            assert tok.decode(ids[: t + 1]).startswith(want)
            assert not tok.decode(ids[:t]).startswith(want)
            checked += 1
    assert checked > 300


def test_chunk_end_tokens_on_trimmed_spaces_and_split_characters():
    # "ab cd" in chunks of 3: "ab " ends in a space the offsets of "Ġcd" leave out (trimmed to (3, 5))
    assert chunk_end_tokens([(0, 0), (0, 2), (3, 5)], 1, 3) == [2]
    # a character split over two tokens ends in the second
    assert chunk_end_tokens([(0, 1), (1, 2), (1, 2), (2, 3)], 1, 2) == [2]
    # chunks past the last token's end are left out
    assert chunk_end_tokens([(0, 2), (3, 5)], 3, 2) == [0, 1]


@pytest.fixture(scope="module")
def tiny_llm():
    from lenserve import LLM

    # 40 blocks of 16 tokens (fp16 KV of random:tiny: 1 KiB a token): room for three 190-token prompts
    return LLM("random:tiny", device="cpu", max_model_len=256, max_num_seqs=4, kv_cache_memory_gb=40 * 16 * 1024 / 2**30)


def _serve(llm, digest: PrefixDigest, text: str) -> None:
    from lenserve import SamplingParams

    digest.record(text, *llm.tokenizer.encode_with_offsets(text))
    llm.generate([text], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)


def test_digest_holds_a_served_prompt_until_its_blocks_are_evicted(tiny_llm):
    bm = tiny_llm.engine.block_manager
    assert bm.num_blocks == 40 and bm.block_size == 16
    digest = PrefixDigest(bm)
    text = _words(0, 190)  # 190 tokens (no BOS): 11 full blocks, the last two chunks end in the 12th
    ids = text_block_ids(text)
    before = time.time()
    _serve(tiny_llm, digest, text)
    report = digest.report()
    assert before <= report["prefix_digest_time"] <= time.time()
    # chunk j is held when the token holding its last character (word number = spaces before it)
    # lies in a full block; a space belongs to the word after it
    held = {ids[j] for j in range(len(ids)) if text[: 64 * (j + 1)].count(" ") < 11 * 16}
    assert len(held) == len(ids) - 2
    assert set(report["prefix_digest"]) == held

    for k in range(1, 6):  # other prompts, until the engine has reused the first prompt's blocks
        _serve(tiny_llm, digest, _words(100 * k + 3, 190))
        if not set(digest.report()["prefix_digest"]) & held:
            break
    first_block = bm._chain_hash(None, tuple(tiny_llm.tokenizer.encode(text)[:16]))
    assert first_block not in bm.hash_to_block  # evicted by the engine, not by the digest
    report = digest.report()
    assert not set(report["prefix_digest"]) & held
    assert set(text_block_ids(_words(100 * k + 3, 190))[:5]) <= set(report["prefix_digest"])


def test_digest_is_bounded():
    from lenserve.engine.random_weights import word_tokenizer
    from lenserve.scheduler.block_manager import BlockManager

    tok = word_tokenizer(512)
    bm = BlockManager(num_blocks=8, block_size=4)
    digest = PrefixDigest(bm)
    assert digest.max_ids == 16
    for k in range(10):
        text = _words(k * 50, 100)
        digest.record(text, *tok.encode_with_offsets(text))
    assert len(digest._block_of) == 16
    bm.hash_to_block = {h: 0 for h in digest._block_of.values()}  # everything cached
    report = digest.report()["prefix_digest"]
    assert len(report) == 16 and set(report) >= set(text_block_ids(_words(9 * 50, 100)))


def test_digest_reports_the_served_prompts_characters_per_token():
    """The router estimates tokens from text at the ratio the replica measures on what it served:
    none before a prompt, then the (decayed) characters over tokens of the prompts recorded."""
    from lenserve.engine.random_weights import word_tokenizer
    from lenserve.scheduler.block_manager import BlockManager

    tok = word_tokenizer(512)
    digest = PrefixDigest(BlockManager(num_blocks=8, block_size=4))
    assert "chars_per_token" not in digest.report()
    text = _words(0, 100)
    ids, offsets = tok.encode_with_offsets(text)
    digest.record(text, ids, offsets)
    assert digest.report()["chars_per_token"] == pytest.approx(len(text) / len(ids))
    long_words = " ".join("w" * 30 for _ in range(100))  # another kind of text: far more characters a token
    for _ in range(300):
        digest.record(long_words, ids, offsets)  # (the ids only count here)
    assert digest.report()["chars_per_token"] == pytest.approx(len(long_words) / len(ids), rel=0.05)


def test_completion_prompts_reach_the_listener_from_one_encoding():
    """The serving hands a listener (the replica's digest) the ids the engine gets, with their characters."""
    from types import SimpleNamespace

    from lenserve.engine.random_weights import word_tokenizer
    from lenserve.server.serving_completion import OpenAIServingCompletion

    tok = word_tokenizer(512)
    serving = OpenAIServingCompletion(SimpleNamespace(tokenizer=tok), ["m"], metrics=None)
    text = _words(0, 30)
    assert serving.encode_prompt(text) == tok.encode(text)
    seen = []
    serving.prompt_listener = lambda *args: seen.append(args)
    assert serving.encode_prompt(text) == tok.encode(text)
    assert seen == [(text, tok.encode(text), tok.encode_with_offsets(text)[1])]
