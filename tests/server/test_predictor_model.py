"""The server predicts lengths as the model it serves: a CASTILLO model by name, else the default."""
from types import SimpleNamespace

import pytest

from lenserve.predictor import PromptInput, load_default_predictor
from lenserve.server.serving import OpenAIServing


@pytest.fixture(scope="module")
def predictor():
    return load_default_predictor()


def _serving(predictor, names, model_name):
    engine = SimpleNamespace(engine=SimpleNamespace(model_name=model_name), tokenizer=None)
    return OpenAIServing(engine, names, metrics=None, predictor=predictor)


def test_a_castillo_checkpoint_is_predicted_as_itself(predictor):
    serving = _serving(predictor, ["my-llama"], "Llama-3.2-1B-Instruct")  # an HF folder's name
    assert serving.predictor_model == "meta-llama/Llama-3.2-1B-Instruct"
    prompt = PromptInput("Write a poem about the sea.", 20, max_tokens=2048)
    [as_llama] = predictor.predict([prompt], model="meta-llama/Llama-3.2-1B-Instruct")
    [as_default] = predictor.predict([prompt])
    assert serving._predict(prompt.text, prompt.num_tokens, prompt.max_tokens) == as_llama != as_default


def test_the_embedded_model_is_the_default(predictor):
    serving = _serving(predictor, ["SmolLM2-135M-Instruct"], "SmolLM2-135M-Instruct")
    assert serving.predictor_model == predictor.default_model
    assert _serving(None, ["x"], "x").predictor_model is None


class _Engine:
    """What the server's probe loading sees of an engine: its model and set_length_probe."""

    def __init__(self, name="SmolLM2-135M-Instruct", num_layers=30, hidden_size=576):
        self.model_name = name
        self.arch = SimpleNamespace(num_layers=num_layers, hidden_size=hidden_size)
        self.length_probe = None

    def set_length_probe(self, probe):
        if probe is not None:
            probe.check_model(self.model_name, self.arch.num_layers, self.arch.hidden_size)
        self.length_probe = probe


def test_the_shipped_probe_reads_the_embedded_model_only():
    from lenserve.server.app import ServerConfig, load_length_models

    eng = _Engine()
    assert load_length_models(ServerConfig(), eng) is not None
    assert eng.length_probe is not None and eng.length_probe.model == "SmolLM2-135M-Instruct"
    other = _Engine("Llama-3.2-1B-Instruct", 16, 2048)  # a user's checkpoint: served without it
    load_length_models(ServerConfig(), other)
    assert other.length_probe is None
    off = _Engine()
    assert load_length_models(ServerConfig(predictor="none"), off) is None
    assert off.length_probe is None  # the default probe follows the predictor
    load_length_models(ServerConfig(predictor="none", length_probe="none"), off)
    assert off.length_probe is None


def test_a_named_probe_that_does_not_fit_is_an_error(tmp_path):
    from lenserve.predictor.model import DEFAULT_DIR
    from lenserve.server.app import ServerConfig, load_length_models

    with pytest.raises(FileNotFoundError, match="no length probe"):
        load_length_models(ServerConfig(length_probe=str(tmp_path)), _Engine())
    with pytest.raises(ValueError, match="cannot read"):
        load_length_models(ServerConfig(length_probe=f"{DEFAULT_DIR}/probe"), _Engine("Qwen2-0.5B", 24, 896))


def test_the_served_model_refines_its_predictions_over_http(tmp_path_factory):
    """The default server: the text predictor at arrival, the shipped probe after each prefill,
    both visible in /metrics."""
    from .conftest import start_server

    with start_server(tmp_path_factory, "--max-num-seqs", "4") as s:
        with s.client() as c:
            for prompt in ("Name a colour.", "Write a short poem about rain."):
                r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 8})
                assert r.status_code == 200, r.text
        assert s.metric("lenserve:length_refinements_total") == 2
        assert s.metric("lenserve:request_refined_length_error_ratio_count") == 2
        assert s.metric("lenserve:request_predicted_length_error_ratio_count") == 2
        assert "length probe: layers 16,24 of SmolLM2-135M-Instruct" in s.log()


def test_a_choice_caps_the_prediction_the_engine_gets(predictor):
    """guided_choice (or an enum schema) bounds the answer: the scheduler gets a prediction no
    longer than the longest choice in tokens plus the end token."""
    from lenserve.engine.loader_gguf import find_embedded_gguf, read_gguf_fields
    from lenserve.engine.sampling_params import SamplingParams
    from lenserve.engine.structured_output import StructuredOutputSpec
    from lenserve.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_fields(read_gguf_fields(find_embedded_gguf()))
    queued = []
    engine = SimpleNamespace(
        engine=SimpleNamespace(model_name="SmolLM2-135M-Instruct"), tokenizer=tok,
        validate=lambda text, params, ids: (text, ids),
        add_request=lambda rid, text, params, prediction, **kw: queued.append(prediction),
    )
    metrics = SimpleNamespace(record_admitted=lambda bucket: None)
    serving = OpenAIServing(engine, ["SmolLM2-135M-Instruct"], metrics=metrics, predictor=predictor)
    text = "Write a long essay about the history of the Roman empire, in detail."
    ids = tok.encode(text)
    serving._submit("free", [(text, ids)], SamplingParams(max_tokens=1000), 0)
    spec = StructuredOutputSpec.choice(["yes", "no", "it depends"])
    serving._submit("choice", [(text, ids)], SamplingParams(max_tokens=1000, structured_output=spec), 0)
    free, capped = queued
    cap = max(len(tok.encode(c, add_special_tokens=False)) for c in ["yes", "no", "it depends"]) + 1
    assert free.p90 > cap and capped.p90 == cap and capped.mean <= cap and capped.bucket == 0
