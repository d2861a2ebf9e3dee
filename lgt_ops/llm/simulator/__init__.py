"""The OpenAI-compatible simulator (a test double for vLLM)."""

from lgt_ops.llm.simulator.config import SimConfig
from lgt_ops.llm.simulator.server import MODEL_PREFIX, BackgroundSimulator, Simulator, serve

__all__ = ["MODEL_PREFIX", "BackgroundSimulator", "SimConfig", "Simulator", "serve"]
