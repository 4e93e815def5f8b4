import pytest

from tests.server.conftest import start_server

API_KEY = "sk-lenserve-Zq8vR2mXw5"
MAX_MODEL_LEN = 256
MAX_BODY = 4096


@pytest.fixture(scope="session")
def guarded_server(tmp_path_factory):
    """One server for the API-key and limit tests: a key, a small body limit, DEBUG logging."""
    args = (
        "--predictor", "none", "--max-model-len", str(MAX_MODEL_LEN), "--max-request-body-bytes", str(MAX_BODY),
        "--max-num-seqs", "16", "--log-level", "DEBUG",
    )
    with start_server(tmp_path_factory, *args, api_key=API_KEY) as s:
        yield s
