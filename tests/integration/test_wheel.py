"""The built wheel carries every subpackage: each module and each stage entry point imports.

The wheel is built with ``pip wheel --no-deps`` and unpacked; a fresh interpreter with the
unpacked wheel first on ``sys.path`` imports every module of the package from it (not from
the source tree) and resolves every registry target and fingerprint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHECK = r"""
import importlib, json, pkgutil, sys
import hymirec_udfs
from hymirec_udfs.pipeline import all_stages
mods = sorted(m.name for m in pkgutil.walk_packages(hymirec_udfs.__path__, "hymirec_udfs."))
for name in mods:
    importlib.import_module(name)
targets = []
for spec in all_stages():
    spec.function()
    targets.append(spec.target)
    if spec.fingerprint:
        module, func = spec.fingerprint.split(":")
        getattr(importlib.import_module(module), func)
from hymirec_udfs.core.config import load_config
load_config(["local"])
print(json.dumps({"file": hymirec_udfs.__file__, "modules": mods, "targets": targets}))
"""


@pytest.mark.slow
def test_wheel_imports_every_subpackage_and_stage(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("hymirec-*.whl"))
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(unpacked))  # imported from the wheel, not the checkout
    source = sorted(
        ".".join(("hymirec_udfs", *p.relative_to(REPO / "hymirec_udfs").with_suffix("").parts)).removesuffix(".__init__")
        for p in (REPO / "hymirec_udfs").rglob("*.py")
    )
    assert sorted(m for m in result["modules"] if not m.startswith("hymirec_udfs.conf")) == [
        m for m in source if m != "hymirec_udfs"
    ]
    assert "hymirec_udfs.recommender.stage:run" in result["targets"]
