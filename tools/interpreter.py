"""The `python` tool: a persistent, notebook-like interpreter in the episode's sandbox."""

from tools.sdk import tool


@tool(kind="code")
def python(code: str) -> str:
    """Run Python code in a persistent, Jupyter-like interpreter and see what it prints.

    Variables, functions and imports persist between calls within one problem. If the
    last line is an expression, its value is shown, as in a notebook cell. sympy and
    numpy are installed. There is no internet access, and only a scratch directory is
    writable. Each call has a time and memory limit.

    Args:
        code: The Python code to run.
    """
    raise RuntimeError("the python tool's code runs in a sandbox session, not here")
