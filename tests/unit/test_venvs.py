"""The clean-venv cache the bundle and oldest-MLflow tests build on (``tests/venvs.py``).

CI at 06bbcf3 reused a cached venv whose runtime links no longer resolved, and two tests
failed on ``No module named 'yaml'`` / ``'pydantic'``. A cached venv that lost files is
rebuilt, not reused.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import venvs


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(venvs, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def _imports_yaml(python: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", "import yaml; print(yaml.__file__)"], capture_output=True, text=True)


def _break_link(home: Path, name: str) -> None:
    runtime = home / "runtime"
    runtime.chmod(0o755)
    link = runtime / name
    link.unlink()
    link.symlink_to(home / "gone" / name)  # a link into a .venv that no longer exists
    runtime.chmod(0o555)


@pytest.mark.slow
def test_a_cached_venv_with_a_dangling_link_is_rebuilt(cache: Path) -> None:
    python = venvs.runtime_venv("probe")
    home = python.parents[1]
    assert _imports_yaml(python).returncode == 0
    assert venvs.intact(home)

    _break_link(home, "yaml")
    assert _imports_yaml(python).returncode != 0  # what CI saw: the cached venv lost yaml
    assert not venvs.intact(home)

    again = venvs.runtime_venv("probe")
    assert again == python  # same key, rebuilt in place
    proc = _imports_yaml(again)
    assert proc.returncode == 0, proc.stderr
    assert venvs.intact(home)


@pytest.mark.slow
def test_a_cached_venv_that_lost_an_installed_file_is_rebuilt(cache: Path) -> None:
    python = venvs.runtime_venv("probe")
    home = python.parents[1]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    pip_init = site / "pip" / "__init__.py"  # pip is a distribution of the venv's own site-packages
    assert pip_init.exists()
    pip_init.unlink()
    assert not venvs.intact(home)
    venvs.runtime_venv("probe")
    assert pip_init.exists() and venvs.intact(home)


def test_the_key_depends_on_where_the_links_point(cache: Path) -> None:
    """Two checkouts at different paths (two .venv folders) get two cached venvs."""
    real = venvs.closure(["pyyaml"])

    def home(root: str) -> Path:
        return venvs.cache_home("probe", {n: _Moved(d, root) for n, d in real.items()}, [], no_deps=False,
                                constrained=True)

    assert home("/checkout-a/.venv") != home("/checkout-b/.venv")
    assert home("/checkout-a/.venv") == home("/checkout-a/.venv")


class _Moved:
    """A distribution as seen from a .venv at another path."""

    def __init__(self, dist, root: str) -> None:
        self.version, self._root = dist.version, root

    def locate_file(self, path: str) -> Path:
        return Path(self._root) / path
