"""The suite's top-level conftest: its presence puts ``tests/`` on ``sys.path``.

``tests/`` is not a package, so pytest (default ``prepend`` import mode) inserts this
file's directory into ``sys.path`` when it loads it, before any test module is imported.
That is what makes the shared test helpers importable from every test folder, e.g.
``from fakes import ScriptedEngine`` (tests/fakes.py).
"""
