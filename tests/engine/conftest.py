import pytest


@pytest.fixture(scope="session")
def llm():
    """The embedded model with default settings (shared; tests must leave it idle)."""
    from lenserve import LLM

    return LLM(max_num_seqs=64, max_model_len=2048)


@pytest.fixture(autouse=True)
def _blocks_back_to_idle(request):
    """After every test that used the shared engine, all its KV blocks are free again."""
    yield
    if "llm" in request.fixturenames:
        llm = request.getfixturevalue("llm")
        eng = llm.engine
        assert not eng.has_unfinished_requests()
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
