"""The learned predictor recovers a known length rule, calibrates p90, and saves/loads exactly."""
import json
import os

import numpy as np
import pytest
from scipy import stats

from lenserve.predictor import cli
from lenserve.predictor.dataset import write_rows
from lenserve.predictor.evaluate import predict_rows
from lenserve.predictor.metrics import evaluate
from lenserve.predictor.model import load_baseline, load_predictor
from lenserve.predictor.train import TrainConfig, fit_baseline, fit_learned
from lenserve.predictor.types import PromptInput

from .synthetic import make_rows

FAST = TrainConfig(num_folds=3, num_calibration_folds=2, num_rounds=120, num_quantile_rounds=80, num_threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train, test = make_rows(500, seed=0), make_rows(150, seed=1)
    predictor = fit_learned(train, FAST, default_model="small-llm")
    path = str(tmp_path_factory.mktemp("pred"))
    predictor.save(path)
    fit_baseline(train, default_model="small-llm").save(os.path.join(path, "baseline"))
    return predictor, path, train, test


def test_recovers_the_length_rule(trained):
    predictor, _, _, test = trained
    preds = predict_rows(predictor, test)
    result = evaluate(test, preds)
    assert result["kendall_tau"] > 0.75
    base = evaluate(test, predict_rows(fit_baseline(make_rows(500, seed=0)), test))
    assert result["mae"] < 0.5 * base["mae"]
    assert 0.8 <= result["p90_coverage"] <= 0.97


def test_model_verbosity_is_learned(trained):
    predictor, _, _, _ = trained
    prompt = [PromptInput("Write 6 sentences about jazz.", 12)]
    small = predictor.predict(prompt, model="small-llm")[0]
    verbose = predictor.predict(prompt, model="verbose-llm")[0]
    assert 1.5 < verbose.mean / small.mean < 2.7
    assert predictor.predict(prompt, model="unknown-llm")[0] == small  # unknown: the default model


def test_quantiles_ordered_and_capped(trained):
    predictor, _, _, test = trained
    prompts = [PromptInput(r.prompt_text, r.input_size, max_tokens=100) for r in test[:50]]
    for p in predictor.predict(prompts):
        qs = [p.quantiles[lv] for lv in sorted(p.quantiles)]
        assert qs == sorted(qs)
        assert p.p90 <= 100 and p.mean <= 100 and p.p50 <= p.p90


def test_save_load_round_trip(trained):
    predictor, path, _, test = trained
    loaded = load_predictor(path)
    assert loaded.char_scorer is not None and loaded.char_scorer.analyzer == "char_wb"
    prompts = [PromptInput(r.prompt_text, r.input_size) for r in test[:40]]
    np.testing.assert_array_equal(predictor.features([p.text for p in prompts], 1), loaded.features([p.text for p in prompts], 1))
    a, b = predictor.predict(prompts, "verbose-llm"), loaded.predict(prompts, "verbose-llm")
    np.testing.assert_allclose([p.mean for p in a], [p.mean for p in b], rtol=1e-3)
    np.testing.assert_allclose([p.p90 for p in a], [p.p90 for p in b], rtol=1e-3)
    assert load_baseline(path).predict(prompts)[0].p90 > 0


def test_chat_markup_does_not_change_the_prediction(trained):
    predictor, _, _, _ = trained
    text = "List 7 facts about owls."
    chat = f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    a, b = predictor.predict([PromptInput(text, 8), PromptInput(chat, 30)])
    assert a.mean == pytest.approx(b.mean) and a.p90 == pytest.approx(b.p90)


def test_eval_cli_prints_the_metrics(trained, tmp_path, capsys):
    _, path, _, test = trained
    data = str(tmp_path / "test.jsonl.gz")
    write_rows(data, test)
    assert cli.main(["predictor", "eval", "--data", data, "--predictor", path, "--llm", "verbose-llm"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {"n", "mae", "rmse", "kendall_tau", "spearman", "bucket_accuracy", "p90_coverage"}
    assert keys | {"baseline"} == set(result)
    assert keys == set(result["baseline"])
    assert result["n"] == 150 and result["kendall_tau"] > result["baseline"]["kendall_tau"]


def test_train_cli_writes_a_predictor_eval_reads(tmp_path, capsys):
    data, out = str(tmp_path / "rows.jsonl.gz"), str(tmp_path / "pred")
    rows = make_rows(300, seed=4)
    write_rows(data, rows)
    assert cli.main(["predictor", "train", "--data", data, "--out", out, "--rounds", "60", "--threads", "1",
                     "--char-vocabulary", "0", "--default-llm", "small-llm"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == len(rows) and summary["default_model"] == "small-llm"
    assert os.path.exists(os.path.join(out, "text_weights.npz")) and not os.path.exists(os.path.join(out, "char_text_weights.npz"))
    assert cli.main(["predictor", "eval", "--data", data, "--predictor", out]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == len(rows)


def test_eval_cli_errors(tmp_path, capsys):
    assert cli.main(["predictor", "eval", "--data", str(tmp_path / "none.jsonl"), "--predictor", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    data = str(tmp_path / "rows.jsonl")
    write_rows(data, make_rows(3))
    assert cli.main(["predictor", "eval", "--data", data, "--predictor", str(tmp_path / "nopred")]) == 2
    assert "missing manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage location booster", "no character scorer weights"])
def test_corrupt_predictor_is_reported(trained, tmp_path, damage):
    import shutil

    _, path, _, _ = trained
    bad = str(tmp_path / "bad")
    shutil.copytree(path, bad)
    if damage == "garbage location booster":
        with open(os.path.join(bad, "location.txt.gz"), "wb") as f:
            f.write(b"garbage")
    else:
        os.remove(os.path.join(bad, "char_text_weights.npz"))
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        load_predictor(bad)


def test_word_scores_only_predictor_saves_and_loads(tmp_path):
    """A predictor without character n-gram scores (as saved before they existed) loads and predicts alike."""
    from dataclasses import replace

    train, test = make_rows(300, seed=2), make_rows(30, seed=3)
    predictor = fit_learned(train, replace(FAST, max_char_vocabulary=0), default_model="small-llm")
    assert predictor.char_scorer is None
    predictor.save(str(tmp_path))
    assert not os.path.exists(tmp_path / "char_text_weights.npz")
    loaded = load_predictor(str(tmp_path))
    assert loaded.char_scorer is None
    prompts = [PromptInput(r.prompt_text, r.input_size) for r in test]
    np.testing.assert_allclose([p.mean for p in loaded.predict(prompts)], [p.mean for p in predictor.predict(prompts)], rtol=1e-3)


def test_log_length_relation_is_monotone(trained):
    predictor, _, _, _ = trained
    prompts = [PromptInput(f"Write {n} sentences about rain.", 10) for n in (1, 3, 6, 12)]
    means = [p.mean for p in predictor.predict(prompts)]
    assert stats.kendalltau(means, [1, 3, 6, 12]).statistic == pytest.approx(1.0)


def test_served_model_resolves_to_a_trained_one(trained):
    predictor = trained[0]
    assert predictor.resolve_model("org/verbose-llm") == "verbose-llm"
    assert predictor.resolve_model("/ckpts/Verbose-LLM/") == "verbose-llm"  # a checkpoint folder, case aside
    assert predictor.resolve_model(None, "my-finetune", "verbose-llm") == "verbose-llm"  # the first that matches
    assert predictor.resolve_model("my-finetune") == predictor.default_model == "small-llm"
