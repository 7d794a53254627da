"""Snapshot of the exact schemas the model receives for the built-in tools.

A change to a built-in tool's signature or docstring changes what every model sees; this
test makes that change deliberate. Regenerate with UPDATE_SNAPSHOTS=1 after reviewing.
"""

import json
import os
from pathlib import Path

from agent_spo.episode.toolbox import Toolbox
from tools import builtin_tools

SNAPSHOT = Path(__file__).parent / "snapshots" / "builtin_tools.json"


def test_builtin_tool_schemas_match_the_snapshot():
    schemas = Toolbox(builtin_tools()).schemas()
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(schemas, indent=2, ensure_ascii=False) + "\n")
    assert schemas == json.loads(SNAPSHOT.read_text())


def test_builtin_names_and_kinds():
    tools = {t.name: t for t in builtin_tools()}
    assert list(tools) == [
        "python",
        "simplify",
        "factor",
        "expand",
        "solve",
        "integrate",
        "evaluate",
    ]
    assert tools["python"].kind == "code" and tools["python"].stateful
    assert all(t.kind == "function" and not t.stateful for n, t in tools.items() if n != "python")
