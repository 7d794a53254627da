"""Tools the agent can call: the tool SDK and the built-in tools.

Imported inside sandboxes, so this package must never import torch or the trainer.
"""
