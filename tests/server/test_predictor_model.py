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
