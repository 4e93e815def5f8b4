import gzip
import json
import os

import pytest

DATA = os.path.join(os.path.dirname(__file__), "data")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def load_test_prompts(n: int | None = None) -> list[str]:
    with gzip.open(os.path.join(DATA, "prompts_1200.jsonl.gz"), "rt") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    return prompts[:n] if n else prompts


@pytest.fixture(scope="session")
def test_prompts() -> list[str]:
    return load_test_prompts()
