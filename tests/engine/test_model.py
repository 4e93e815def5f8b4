"""Model correctness: the embedded GGUF against transformers' GGUF loading, and HF checkpoints."""
import json
import os

import pytest
import torch

from lenserve.engine.loader_gguf import find_embedded_gguf
from lenserve.engine.loader_hf import load_model_files
from lenserve.engine.model import LlamaModel

from .helpers import full_logits

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours():
    cfg, weights, tok, _ = load_model_files(None)
    return LlamaModel.from_weights(cfg, weights, torch.float32, torch.device("cpu"), prepack_linear=False), tok


def test_logits_match_transformers_gguf_loading(ours, test_prompts):
    """Same GEMM as transformers (torch's): every logit within 2e-4 (logits reach ~16; the largest
    gap was 1.0e-4 with transformers 5.24, whose own fp32 order of operations moves it between
    releases). The oneDNN-prepacked weights the engine uses on CPU accumulate in another order:
    within 5e-4 on the same prompts."""
    model, tok = ours
    path = find_embedded_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    long_text = tok.encode(" ".join(test_prompts[:40]))[:700]
    prompts = [tok.encode("The capital of France is"), tok.encode("def fib(n):\n    return"), tok.encode(test_prompts[3]), long_text]
    cfg, weights, _, _ = load_model_files(None)
    packed_model = LlamaModel.from_weights(cfg, weights, torch.float32, torch.device("cpu"), prepack_linear=True)
    got = full_logits(model, prompts)  # all prompts packed into one forward, fp32 KV cache
    got_packed = full_logits(packed_model, prompts)
    for p, g, gp in zip(prompts, got, got_packed):
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0]
        assert (g - want).abs().max().item() < 2e-4
        assert (gp - want).abs().max().item() < 5e-4


def test_capital_of_france_is_paris(llm):
    from lenserve import SamplingParams

    out = llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.text.strip().startswith("Paris")
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def _write_tokenizer(tok, path):
    tok.hf.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": tok.chat_template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}, f)


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("llama", {}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        ("qwen2", {}),
    ],
)
def test_hf_checkpoint_matches_transformers(tmp_path, ours, arch, extra):
    _, tok = ours
    torch.manual_seed(0)
    common = dict(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=arch == "qwen2", eos_token_id=2, bos_token_id=1,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common, **extra)
        ref = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common)
        ref = transformers.Qwen2ForCausalLM(config)
    ref = ref.float().eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    _write_tokenizer(tok, str(tmp_path))

    cfg, weights, hf_tok, _ = load_model_files(str(tmp_path))
    assert cfg.architecture == arch and cfg.attention_bias == (arch == "qwen2")
    model = LlamaModel.from_weights(cfg, weights, torch.float32, torch.device("cpu"))
    prompts = [hf_tok.encode("Hello there, how are you?"), list(range(5, 150))]
    got = full_logits(model, prompts)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0]
        assert (g - want).abs().max().item() < 2e-4
    assert hf_tok.eos_token_id == 2 and hf_tok.chat_template


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_files(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="not supported"):
        load_model_files(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_model_files(str(tmp_path / "nope.bin"))
