"""Model-free checks of the sampler's top-k / top-p / min-p filtering and of what it samples."""
from types import SimpleNamespace

import pytest
import torch

from lenserve.engine.sampler import Sampler
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
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
        idx, vals = Sampler._candidates(probs, params)
        got = {i: v for i, v in zip(range(len(vals)), vals.tolist())} if idx is None else dict(zip(idx.tolist(), vals.tolist()))
        got = {i: v for i, v in got.items() if v > 0}
        want = {i: v for i, v in reference_kept(probs, top_k, top_p, min_p).items() if v > 0}
        assert set(got) == set(want)
        for i in want:
            assert got[i] == pytest.approx(want[i], rel=1e-6)


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
