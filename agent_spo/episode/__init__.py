"""Episodes: the token-exact trajectory record (and, next, formats and the runner)."""
