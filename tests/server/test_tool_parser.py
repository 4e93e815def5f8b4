"""The Hermes tool-call parser and the constraint's cap on predicted lengths, without a model."""
from lenserve.engine.structured_output import StructuredOutputSpec
from lenserve.predictor.types import LengthPrediction
from lenserve.server.serving_engine import _capped
from lenserve.server.tool_parsers import HermesToolParser as P


def test_extract_calls_and_content():
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = P.extract(text)
    assert content == "Sure."
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"x": 1}'), ("g", "{}")]
    assert P.extract("no calls here") == ("no calls here", [])
    broken = '<tool_call>{"name": "f", "argu'
    assert P.extract(broken) == (broken, [])


def test_content_end_holds_back_a_possible_tag():
    assert P.content_end("Hello <tool_c") == len("Hello ")
    assert P.content_end("Hello <b>") == len("Hello <b>")
    assert P.content_end("Hi <tool_call>{") == len("Hi ")


def test_history_for_a_template_without_tools():
    tools = [{"type": "function", "function": {"name": "f"}}]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 2}'}}]},
            {"role": "tool", "content": "7", "tool_call_id": "1"}]
    out = P.render_history(msgs, tools)
    assert out[0]["role"] == "system" and '"name": "f"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"a": 2}}\n</tool_call>'
    assert out[3] == {"role": "user", "content": "<tool_response>\n7\n</tool_response>"}


def test_bounded_answers_cap_the_prediction():
    assert StructuredOutputSpec.choice(["yes", "no"]).bounded_answers() == ["yes", "no"]
    assert StructuredOutputSpec.json_schema({"enum": ["a", 1]}).bounded_answers() == ['"a"', "1"]
    assert StructuredOutputSpec.json_schema({"type": "object"}).bounded_answers() is None
    pred = LengthPrediction(mean=180.0, p50=150.0, p90=400.0, bucket=2, quantiles={0.5: 150.0, 0.9: 400.0})
    capped = _capped(pred, 3)
    assert (capped.mean, capped.p50, capped.p90, capped.bucket) == (3, 3, 3, 0) and capped.quantiles == {0.5: 3, 0.9: 3}
    assert _capped(pred, 1000) is pred and _capped(None, 3) is None
