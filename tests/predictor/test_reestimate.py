"""Remaining-length re-estimation from a predicted distribution."""
import pytest

from lenserve.predictor.reestimate import remaining_length
from lenserve.predictor.types import LengthPrediction

PRED = LengthPrediction(mean=300, p50=250, p90=600, bucket=3,
                        quantiles={0.1: 80, 0.25: 150, 0.5: 250, 0.75: 400, 0.9: 600})


def test_nothing_generated_gives_the_prediction():
    r = remaining_length(PRED, 0)
    assert r.p50 == pytest.approx(250, rel=1e-6)
    assert r.p90 == pytest.approx(600, rel=1e-6)
    assert r.quantiles[0.25] == pytest.approx(150, rel=1e-6)
    assert 250 < r.mean < 600


@pytest.mark.parametrize("k", [1, 50, 249, 250, 599, 600, 601, 2000, 10000])
def test_total_exceeds_what_was_generated(k):
    r = remaining_length(PRED, k)
    assert r.mean >= 1 and r.p50 >= 1 and r.p90 >= r.p50
    assert k + r.p90 >= 600  # the conditional p90 of the total never drops below the unconditional one


def test_total_quantiles_grow_with_k():
    totals = [k + remaining_length(PRED, k).p90 for k in range(0, 3000, 25)]
    assert all(b >= a - 1e-6 for a, b in zip(totals, totals[1:]))


def test_heavy_tail_beyond_the_top_quantile():
    # Past p90 the tail is Pareto: the expected remainder grows in proportion to what was generated.
    r1, r2 = remaining_length(PRED, 1000), remaining_length(PRED, 2000)
    assert r2.mean == pytest.approx(2 * r1.mean, rel=1e-6)
    assert r1.mean > 100


def test_max_tokens_caps_the_total():
    r = remaining_length(PRED, 900, max_tokens=1000)
    assert r.p90 <= 100 and r.mean <= 100 and r.p50 <= 100


def test_works_from_p50_p90_alone():
    r = remaining_length(LengthPrediction(mean=100, p50=80, p90=200, bucket=1), 300)
    assert r.p50 > 1 and r.p90 > r.p50


def test_degenerate_prediction():
    r = remaining_length(LengthPrediction(mean=50, p50=50, p90=50, bucket=0), 10)
    assert r.p50 >= 1 and r.mean >= 1


def test_negative_k_rejected():
    with pytest.raises(ValueError, match="num_generated"):
        remaining_length(PRED, -1)
