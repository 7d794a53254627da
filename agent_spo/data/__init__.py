"""Training and benchmark problems: loading local files, stable ids, synthetic tasks."""

from agent_spo.data.problems import Dataset, Problem, load_problems, prompt_key

__all__ = ["Dataset", "Problem", "load_problems", "prompt_key"]
