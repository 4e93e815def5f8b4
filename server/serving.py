"""The OpenAI endpoints together, as the single server (app.py) and each Ray replica serve them:
completions (serving_completion.py) and chat (serving_chat.py) on the shared base (serving_engine.py)."""
from __future__ import annotations

from lenserve.server.serving_chat import OpenAIServingChat
from lenserve.server.serving_completion import OpenAIServingCompletion


class OpenAIServing(OpenAIServingChat, OpenAIServingCompletion):
    pass
