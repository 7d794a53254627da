"""agent-spo: Single-stream Policy Optimization for tool-integrated math agents."""

__version__ = "0.1.0"
