"""Response-length prediction (CASTILLO-style). Heavy parts load lazily."""
from lenserve.predictor.reestimate import remaining_length
from lenserve.predictor.types import DEFAULT_BUCKET_EDGES, LengthPrediction, PromptInput, bucket_of


def load_default_predictor():
    """The predictor shipped for the embedded SmolLM2 (lenserve/predictor/models/default); loads in under 1 s."""
    from lenserve.predictor.model import load_default_predictor as load

    return load()


def load_predictor(path: str):
    """The predictor saved in directory `path` by `lenserve predictor train`."""
    from lenserve.predictor.model import load_predictor as load

    return load(path)


__all__ = [
    "DEFAULT_BUCKET_EDGES", "LengthPrediction", "PromptInput", "bucket_of", "load_default_predictor",
    "load_predictor", "remaining_length",
]
