"""Response-length prediction (CASTILLO-style). Heavy parts load lazily."""
from lenserve.predictor.types import DEFAULT_BUCKET_EDGES, LengthPrediction, PromptInput, bucket_of

__all__ = ["DEFAULT_BUCKET_EDGES", "LengthPrediction", "PromptInput", "bucket_of"]
