"""Generation engines behind one async protocol (base.Engine)."""

from agent_spo.engines.base import Engine, EngineError, Generation, Sampling

__all__ = ["Engine", "EngineError", "Generation", "Sampling"]
