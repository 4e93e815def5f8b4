"""make_default: one joint predictor over CASTILLO-style rows and the served model's set, with
every held-out prompt text kept out of training on both sides."""
import json

from lenserve.predictor.dataset import castillo_held_out, write_rows
from lenserve.predictor.make_default import make_default, markdown, partition
from lenserve.predictor.model import load_predictor
from lenserve.predictor.train import TrainConfig

from .synthetic import make_rows

FAST = TrainConfig(num_folds=3, num_calibration_folds=2, num_rounds=120, num_quantile_rounds=80, num_threads=1)


def _served_rows(num_prompts, seed):
    rows = make_rows(num_prompts, seed=seed, models={"served-llm": 1.5})
    for r in rows:
        r.split = ""  # as the builder writes them: split by a hash of the prompt id
        r.__post_init__()
    return rows


def test_partition_keeps_held_out_texts_out_of_training():
    castillo, served = make_rows(400, seed=0), _served_rows(300, seed=2)
    parts = partition(castillo, served)
    held = {r.prompt_text.strip() for k in ("castillo_holdout", "served_validate", "served_test") for r in parts[k]}
    assert parts["castillo_holdout"] and parts["served_validate"] and parts["served_test"]
    assert not held & {r.prompt_text.strip() for r in parts["train"]}
    assert all(castillo_held_out(r.prompt_text) for r in parts["castillo_holdout"])
    # synthetic texts repeat across prompt ids: some rows are out only because another side holds their text
    own_side = [r for r in castillo if not castillo_held_out(r.prompt_text)] + [r for r in served if r.split == "train"]
    assert len(parts["train"]) < len(own_side)


def test_make_default_from_a_build_in_progress(tmp_path):
    castillo = tmp_path / "castillo_train.jsonl.gz"
    write_rows(str(castillo), make_rows(400, seed=0))
    served = tmp_path / "served.jsonl.gz"
    with open(str(served) + ".partial", "w") as f:  # the builder's partial file, a prompt written twice
        rows = _served_rows(300, seed=2)
        for r in rows + rows[:3]:
            f.write(json.dumps(r.to_dict()) + "\n")
    out = tmp_path / "pred"
    result = make_default([str(castillo)], str(served), str(out), FAST)
    assert result["served_set"] == {"path": str(served), "prompts": 300, "complete": False}
    predictor = load_predictor(str(out))
    assert predictor.default_model == "served-llm" and set(predictor.models) == {"served-llm", "small-llm", "verbose-llm"}
    test = result["served_test"]
    assert test["n"] > 10 and test["kendall_tau"] > 0.6 and test["kendall_tau"] > test["baseline"]["kendall_tau"]
    c = result["castillo_holdout"]
    assert set(c["per_model"]) == {"small-llm", "verbose-llm"} and c["mean_over_models"]["kendall_tau"] > 0.6
    table = markdown(result)
    assert "served-llm test" in table and "CASTILLO mean over models" in table


def test_validate_file_rows_are_reported_apart_and_eval_only_keeps_the_fitted_model(tmp_path):
    castillo_rows = make_rows(400, seed=0)
    for i, r in enumerate(castillo_rows):
        r.split = "validate" if i % 2 else "train"
    castillo = tmp_path / "castillo.jsonl.gz"
    write_rows(str(castillo), castillo_rows)
    served = tmp_path / "served.jsonl.gz"
    write_rows(str(served), _served_rows(300, seed=2))
    out = tmp_path / "pred"
    fitted = make_default([str(castillo)], str(served), str(out), FAST)
    v = fitted["castillo_holdout_validate_file"]
    held_validate = [r for r in castillo_rows if r.split == "validate" and castillo_held_out(r.prompt_text)]
    assert v["all_rows"]["n"] == len(held_validate) < fitted["castillo_holdout"]["all_rows"]["n"]
    assert "validate-file prompts" in markdown(fitted)
    model_file = out / "location.txt.gz"
    before = model_file.read_bytes()
    again = make_default([str(castillo)], str(served), str(out), FAST, fit=False)
    assert model_file.read_bytes() == before and "train_s" not in again
    assert again["castillo_holdout_validate_file"] == v and again["served_test"] == fitted["served_test"]
