"""Package layering: tools/ and sandboxes/ stay free of torch and of the trainer."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["tools", "sandboxes"])
def test_package_imports_without_torch_or_trainer(package):
    code = (
        f"import sys, {package}, pkgutil, importlib\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'agent_spo'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{package} pulled in: {out.stdout.strip()}"


def test_algo_core_has_no_io_or_config_imports():
    code = (
        "import sys, agent_spo.algo\n"
        "bad = sorted(m for m in sys.modules if m in ('agent_spo.config', 'yaml', 'httpx',"
        " 'transformers', 'agent_spo.cli'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
