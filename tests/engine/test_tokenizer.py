"""The GGUF-built tokenizer against transformers' on real prompts, and incremental detokenization."""
import pytest

from lenserve.engine.detokenizer import IncrementalDetokenizer
from lenserve.engine.loader_gguf import find_embedded_gguf


@pytest.fixture(scope="module")
def tok():
    from lenserve.engine.loader_gguf import read_gguf_fields
    from lenserve.engine.tokenizer import Tokenizer

    return Tokenizer.from_gguf_fields(read_gguf_fields(find_embedded_gguf()))


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    import os

    path = find_embedded_gguf()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_encodes_like_transformers_on_real_prompts(tok, hf_tok, test_prompts):
    """transformers' GGUF converter ignores `tokenizer.ggml.pre` ("smollm"), which llama.cpp and
    SmolLM2's own tokenizer.json implement as a digit split before GPT-2's regex. So: with the
    digit split given to transformers' tokenizer too, every prompt encodes identically; and
    untouched, every prompt without digits does."""
    from tokenizers import pre_tokenizers

    assert len(test_prompts) >= 1000
    ours = tok.encode_batch(test_prompts)
    plain = [hf_tok(p, add_special_tokens=True)["input_ids"] for p in test_prompts]
    no_digit = [i for i, p in enumerate(test_prompts) if not any(c.isdigit() for c in p)]
    assert len(no_digit) > 300
    assert all(ours[i] == plain[i] for i in no_digit)

    backend = hf_tok.backend_tokenizer
    saved = backend.pre_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    try:
        with_digits = [hf_tok(p, add_special_tokens=True)["input_ids"] for p in test_prompts]
    finally:
        backend.pre_tokenizer = saved
    mismatches = [i for i in range(len(test_prompts)) if ours[i] != with_digits[i]]
    assert mismatches == []


def test_digits_split_and_specials_whole(tok):
    ids = tok.encode("2024")
    assert len(ids) == 4 and tok.decode(ids) == "2024"
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and 2 in ids
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids) == "user\nhi"


def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nS")


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🤖🚀 done", "mixed Ωmega ∑ and 🎉"])
def test_incremental_detokenization_multibyte(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add_token(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_straddling_tokens_never_leaks(tok):
    text = "The answer is forty-two. STOP here and more text"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, stop=["STOP here"])
    streamed = ""
    for t in ids:
        streamed += detok.add_token(t)
        if detok.stop_hit:
            break
    streamed += detok.flush()
    assert detok.stop_hit == "STOP here"
    assert streamed == "The answer is forty-two. "
    detok2 = IncrementalDetokenizer(tok, stop=["STOP here"], include_stop_str_in_output=True)
    out = "".join(detok2.add_token(t) for t in ids if not detok2.stop_hit) + detok2.flush()
    assert out == "The answer is forty-two. STOP here"
