"""Evaluation: avg@k, pass@k (unbiased) and maj@k on math benchmarks (spec §7)."""
