from pathlib import Path

import pytest

from lenserve.traces.fake_server import FakeOpenAIServer, FakeServerConfig

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "traces"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def fake_server():
    """A fake OpenAI endpoint on 127.0.0.1 (free port) in a background thread, stopped after the test."""
    server = FakeOpenAIServer(FakeServerConfig(ttft_s=0.005, itl_s=0.001)).start_in_thread()
    try:
        yield server
    finally:
        server.stop_thread()
