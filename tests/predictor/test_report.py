"""report --crossfit: every evaluation row is predicted by a predictor that never saw its prompt
text (for any LLM), fitted on the training file and the other folds."""
from lenserve.predictor.report import crossfit, crossfit_fold
from lenserve.predictor.types import LengthPrediction

from .synthetic import make_rows


class _Recorder:
    """A fake fit: remembers the texts it was fitted on and answers with them."""

    def __init__(self, rows):
        self.texts = {r.prompt_text.strip() for r in rows}
        self.models = sorted({r.model for r in rows})
        self.default_model = self.models[0]

    def predict(self, inputs, model=None):
        return [LengthPrediction(mean=1.0, p50=1.0, p90=2.0, bucket=0,
                                 quantiles={0.5: float(p.text.strip() in self.texts)}) for p in inputs]


def test_crossfit_predicts_each_row_without_its_text_and_with_the_rest():
    train, test = make_rows(60, seed=0), make_rows(90, seed=1)
    fits = []

    def fit(rows):
        fits.append(_Recorder(rows))
        return fits[-1]

    preds = crossfit(train, test, 3, fit)
    assert len(fits) == 3 and len(preds) == len(test)
    assert all(p is not None and p.quantiles[0.5] == 0.0 for p in preds)  # its own text never seen
    for fold, rec in enumerate(fits):
        others = {r.prompt_text.strip() for r in test if crossfit_fold(r.prompt_text, 3) != fold}
        held = {r.prompt_text.strip() for r in test if crossfit_fold(r.prompt_text, 3) == fold}
        assert others - held <= rec.texts and not held & rec.texts
        assert {r.prompt_text.strip() for r in train} - held <= rec.texts
    # a text lands in one fold whatever the LLM, and the folds are the same on every run
    by_text = {}
    for r in test:
        by_text.setdefault(r.prompt_text.strip(), set()).add(crossfit_fold(r.prompt_text, 3))
    assert all(len(f) == 1 for f in by_text.values()) and len({crossfit_fold(t, 3) for t in by_text}) == 3
