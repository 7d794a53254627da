"""`python -m agent_spo.cli`: the same as the `agent-spo` command."""

from agent_spo.cli import app

app()
