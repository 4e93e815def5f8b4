"""Prepacking: which waiting prompts fill a step's token budget, with no padding.

Prompts of different lengths are concatenated into one packed forward (cu_seqlens), so a step's
cost is the sum of its real tokens; packing only decides which prompts, and how much of each,
go into this step's budget.
"""
from __future__ import annotations

from typing import Sequence


def prepack(sizes: Sequence[int], budget: int, allow_chunk: bool = True) -> list[int]:
    """Tokens each candidate prefills this step; candidates come in policy order (index 0 is the head).

    The head goes first, whole or as a chunk that fills the budget, so it always makes progress.
    The others follow first-fit decreasing (one bin: the largest that still fits goes next), and
    whatever budget is left goes, as a chunk, to the best-ranked candidate not placed. The result
    never sums to more than `budget`; a 0 means the candidate waits.
    """
    takes = [0] * len(sizes)
    if not sizes or budget <= 0:
        return takes
    left = budget
    if sizes[0] <= left:
        takes[0] = sizes[0]
        left -= sizes[0]
    elif allow_chunk:
        takes[0] = left
        left = 0
    else:
        return takes
    for i in sorted(range(1, len(sizes)), key=lambda i: -sizes[i]):
        if left == 0:
            break
        if 0 < sizes[i] <= left:
            takes[i] = sizes[i]
            left -= sizes[i]
    if left and allow_chunk:
        for i in range(1, len(sizes)):
            if takes[i] == 0 and sizes[i] > 0:
                takes[i] = min(left, sizes[i])
                break
    return takes
