"""Project rules a user relies on: the device runtime works without the host side, code is lint-clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_WITHOUT_HOST = """
import sys, pkgutil, importlib
sys.modules['gguf'] = None                # as on a device without the host extra
import edgepack.runtime as rt
for mod in pkgutil.iter_modules(rt.__path__):
    importlib.import_module('edgepack.runtime.' + mod.name)
assert not [m for m in sys.modules if m.startswith('edgepack.packager')], 'runtime imported the packager'
from edgepack.runtime.cli import main
sys.argv = ['edgepack', '--help']
main()
"""


def test_runtime_imports_and_runs_without_the_packager():
    result = subprocess.run([sys.executable, "-c", _WITHOUT_HOST], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("install", "rollback", "serve", "run", "boards"):
        assert command in result.stdout
    assert "build" not in result.stdout


_SERVE_IMPORTS = """
import sys
import edgepack.runtime.cli, edgepack.runtime.server, edgepack.runtime.pool
from edgepack.runtime.cli import cli
cli.get_command(None, 'serve')
print(' '.join(m for m in ('edgepack.runtime.tune', 'edgepack.runtime.systemd_unit') if m in sys.modules))
"""


def test_serve_imports_neither_the_tuning_sweep_nor_the_unit_writer():
    result = subprocess.run([sys.executable, "-c", _SERVE_IMPORTS], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_the_version_is_the_distributions():
    from importlib.metadata import version

    from edgepack.runtime import __version__

    assert __version__ == version("edgepack") and f'version = "{__version__}"' in (ROOT / "pyproject.toml").read_text()


def test_host_commands_are_added_when_installed():
    result = subprocess.run([sys.executable, "-m", "edgepack.runtime.cli", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert all(c in result.stdout for c in ("build", "inspect", "demo"))


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "runtime", "packager", "tests", "bench"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
