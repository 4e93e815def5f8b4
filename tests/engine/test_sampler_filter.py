"""Model-free checks of the sampler's top-k / top-p / min-p filtering and of what it samples."""
from types import SimpleNamespace

import pytest
import torch

from lenserve.engine.sampler import Sampler, filter_candidates
from lenserve.engine.sampling_params import SamplingParams


def reference_kept(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> dict[int, float]:
    """The tokens a full sort keeps, by the definitions (the first token always stays)."""
    p = probs.clone()
    if min_p > 0:
        p[p < min_p * p.max()] = 0
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    total = float(p.sum())
    kept, mass = {}, 0.0
    for rank, i in enumerate(order):
        if top_k > 0 and rank >= top_k:
            break
        if top_p < 1.0 and mass >= top_p * total:
            break
        kept[i] = float(p[i])
        mass += float(p[i])
    return kept


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 0.9, 0.0), (5, 1.0, 0.0), (7, 0.6, 0.0), (50, 0.95, 0.05), (1, 0.5, 0.0), (0, 1.0, 0.1),
                                              (200, 0.3, 0.0), (0, 5e-324, 0.0), (50, 5e-324, 0.0)])
def test_candidates_match_a_full_sort(top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    for _ in range(5):
        probs = torch.softmax(torch.randn(137, generator=gen) * 2.5, dim=-1)
        vals, idx = filter_candidates(probs[None], [top_k], [top_p], [min_p])
        got = {i: v for i, v in zip(idx[0].tolist(), vals[0].tolist()) if v > 0}
        want = {i: v for i, v in reference_kept(probs, top_k, top_p, min_p).items() if v > 0}
        assert set(got) == set(want)
        for i in want:
            assert got[i] == pytest.approx(want[i], rel=1e-6)


def test_filter_candidates_batches_rows_with_different_settings():
    """One batched call keeps, for each row, what that row filtered alone keeps: rows with and without
    top-k mixed (the mix forces a full sort), and a row with no filter keeps everything."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(6, 211, generator=gen) * 2.0, dim=-1)
    top_k = [0, 5, 40, 1, 0, 300]
    top_p = [0.9, 1.0, 0.5, 1.0, 1.0, 0.3]
    min_p = [0.0, 0.0, 0.05, 0.0, 0.0, 0.0]

    def kept(vals, idx):
        return {i: v for i, v in zip(idx.tolist(), vals.tolist()) if v > 0}

    vals, idx = filter_candidates(probs, top_k, top_p, min_p)
    for i in range(6):
        alone = filter_candidates(probs[i : i + 1], top_k[i : i + 1], top_p[i : i + 1], min_p[i : i + 1])
        assert kept(vals[i], idx[i]) == kept(alone[0][0], alone[1][0])
        assert set(kept(vals[i], idx[i])) == set(reference_kept(probs[i], top_k[i], top_p[i], min_p[i]))
    assert len(kept(vals[4], idx[4])) == 211
    k_only = filter_candidates(probs[1:4], top_k[1:4], top_p[1:4], min_p[1:4])
    assert k_only[0].shape == (3, 40)  # every row limits top-k: a top-40 selection, no full sort


def test_seeded_row_ignores_its_batch():
    """A seeded row's token is the same alone and beside rows with other filters and seeds."""
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))
    seeded = SamplingParams(temperature=0.9, top_k=20, seed=11)
    other = [SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.5, top_k=200, seed=3)]

    def run(rows):
        sampler = Sampler(vocab_size=300)
        seqs = [SimpleNamespace(params=p, num_output_tokens=5, request_id=f"r{i}") for i, p in enumerate(rows)]
        return [sampler(logits[: len(rows)], seqs).token_ids[0] for _ in range(10)]

    assert run([seeded]) == run([seeded, *other])


def test_batched_penalties_match_the_definitions():
    """Repetition, presence and frequency penalties, logit bias and the min_tokens ban, applied to a
    batch in one pass, equal the per-row definitions."""
    vocab = 50
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(5))
    p0 = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    p1 = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={7: 2.0, 9: -1.5})
    p2 = SamplingParams(temperature=0.0, min_tokens=3)
    seqs = [
        SimpleNamespace(params=p0, token_ids=[1, 2, 2, 30], output_token_ids=[30], num_output_tokens=1),
        SimpleNamespace(params=p1, token_ids=[4, 5, 5, 5, 6], output_token_ids=[5, 5, 6], num_output_tokens=3),
        SimpleNamespace(params=p2, token_ids=[8], output_token_ids=[], num_output_tokens=0, stop_token_ids={11},
                        eos_token_id=2, ignore_eos=False),
    ]
    before = logits.clone()
    got = Sampler._process(logits, seqs, [s.params for s in seqs], [0, 1, 2])
    want = logits.clone()
    for t in {1, 2, 30}:
        v = want[0, t]
        want[0, t] = v / 1.3 if v > 0 else v * 1.3
    counts = torch.bincount(torch.tensor([5, 5, 6]), minlength=vocab).float()
    want[1] -= 0.25 * counts + 0.5 * (counts > 0).float()
    want[1, 7] += 2.0
    want[1, 9] -= 1.5
    want[2, [2, 11]] = float("-inf")
    assert torch.allclose(got, want)
    assert torch.equal(logits, before)  # the input is left alone


def test_samples_follow_the_kept_distribution():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]])
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.9)
    seq = SimpleNamespace(params=params, num_output_tokens=5, request_id="r")
    sampler = Sampler(vocab_size=8)
    kept = reference_kept(torch.softmax(logits[0], -1), 4, 0.9, 0.0)
    total = sum(kept.values())
    torch.manual_seed(0)
    n = 6000
    counts = torch.zeros(8)
    for _ in range(n):
        counts[sampler(logits, [seq]).token_ids[0]] += 1
    assert set(torch.nonzero(counts).flatten().tolist()) == set(kept)  # nothing outside the kept set
    for i, p in kept.items():
        expected = p / total
        assert abs(counts[i] / n - expected) < 4 * (expected * (1 - expected) / n) ** 0.5 + 1e-3


def test_seeded_rows_repeat():
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=7)

    def run():
        sampler = Sampler(vocab_size=300)
        seqs = [SimpleNamespace(params=params, num_output_tokens=5, request_id=f"r{i}") for i in range(2)]
        return [sampler(logits, seqs).token_ids for _ in range(20)]

    assert run() == run()


def test_greedy_rows_take_the_same_ids_on_the_short_path():
    """Greedy rows with nothing to adjust or report skip the sampler's tensors (a numpy argmax
    straight to a list): the same ids as torch's argmax, ties to the first and NaN as the largest,
    and as the general path gives the same rows when one row in the batch asks for logprobs."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(5))
    logits[1, 3] = logits[1, 7] = float("nan")
    logits[2, :] = 1.0
    logits[3, 10] = logits[3, 20] = 100.0
    plain = SamplingParams(temperature=0)
    seqs = [SimpleNamespace(params=plain, num_output_tokens=5, request_id=f"r{i}") for i in range(5)]
    sampler = Sampler(vocab_size=300)
    short = sampler(logits, seqs)
    assert short.token_ids == logits.argmax(dim=-1).tolist() and short.logprobs == [None] * 5
    assert all(type(t) is int for t in short.token_ids)
    seqs[4] = SimpleNamespace(params=SamplingParams(temperature=0, logprobs=2), num_output_tokens=5, request_id="r4")
    general = sampler(logits, seqs)
    assert general.token_ids == short.token_ids and general.logprobs[4] is not None
