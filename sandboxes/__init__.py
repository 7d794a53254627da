"""Where untrusted tool calls run: the in-sandbox runner and the backends that start it.

Must never import torch or the trainer (`agent_spo`); the trainer depends on this package,
never the reverse.
"""
