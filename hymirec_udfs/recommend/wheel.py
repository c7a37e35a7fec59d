"""The project wheel that travels with a logged model (``code_paths``).

A model logged by one release must load with that release's code, wherever it is served:
:func:`project_wheel` builds a wheel of the *running* package (``hymirec_udfs`` plus its
YAML configuration) whose version carries a hash of its files (``0.1.0+g<12 hex>``), so
the model's ``requirements.txt`` names exactly the code that logged it
(``code/hymirec-0.1.0+g....whl``; MLflow resolves that path in the model directory when
it restores the model's environment: ``spark_udf(env_manager="virtualenv")``, ``mlflow
models serve``, Databricks Model Serving).

The wheel is built with pip (``pip wheel --no-deps --no-build-isolation --no-index``, no
network) from a copy of the package as imported, so it works the same from a checkout,
an editable install or an installed wheel on a cluster. Built once per content hash and
cached under ``cache_dir``: about 3 s the first time, nothing after.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DISTRIBUTION = "hymirec"

_SETUP = """from setuptools import find_packages, setup
setup(name={name!r}, version={version!r}, packages=find_packages(include=["hymirec_udfs", "hymirec_udfs.*"]),
      package_data={{"hymirec_udfs.conf": ["*.yaml"]}}, install_requires={requires!r}, python_requires=">=3.11",
      entry_points={{"console_scripts": ["hymirec=hymirec_udfs.cli:main"]}})
"""


class WheelBuildError(RuntimeError):
    """pip could not build the project wheel (its output is in the message)."""


def _sources() -> list[tuple[str, Path]]:
    """(path inside the wheel's tree, file) for every file of the package and its conf."""
    import hymirec_udfs

    package = Path(hymirec_udfs.__file__).resolve().parent
    files = [(str(p.relative_to(package.parent)), p) for p in sorted(package.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    if not (package / "conf").is_dir():  # a checkout: conf/ sits beside the package
        conf = package.parent / "conf"
        files += [(f"hymirec_udfs/conf/{p.name}", p) for p in sorted(conf.glob("*"))
                  if p.suffix in (".yaml", ".py")]
    return files


def _base_version() -> str:
    try:
        return md.version(DISTRIBUTION).split("+")[0]
    except md.PackageNotFoundError:
        return "0.0.0"


def _requirements() -> list[str]:
    """The installed distribution's own runtime requirements (extras left out)."""
    try:
        requires = md.requires(DISTRIBUTION) or []
    except md.PackageNotFoundError:
        return []
    return [r for r in requires if "extra ==" not in r and "extra==" not in r]


def project_wheel(cache_dir: Path) -> Path:
    """The wheel of the running package (see the module docstring), built into
    ``cache_dir/<hash>/`` unless it is there already."""
    files = _sources()
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    version = f"{_base_version()}+g{digest.hexdigest()[:12]}"
    out = Path(cache_dir) / digest.hexdigest()[:12]
    found = sorted(out.glob(f"{DISTRIBUTION}-*.whl")) if out.is_dir() else []
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(prefix="hymirec-wheel-") as tmp:
        project = Path(tmp) / "project"
        for rel, path in files:
            target = project / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        (project / "hymirec_udfs" / "conf" / "__init__.py").touch()
        (project / "setup.py").write_text(_SETUP.format(name=DISTRIBUTION, version=version,
                                                        requires=_requirements()))
        built = Path(tmp) / "dist"
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                               "--no-index", "-w", str(built), str(project)],
                              capture_output=True, text=True, cwd=tmp)
        wheels = sorted(built.glob(f"{DISTRIBUTION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise WheelBuildError(f"pip wheel of the hymirec package failed (rc {proc.returncode}): "
                                  f"{(proc.stderr or proc.stdout)[-2000:]}")
        out.mkdir(parents=True, exist_ok=True)
        partial = out / (wheels[0].name + ".partial")
        shutil.copyfile(wheels[0], partial)
        partial.rename(out / wheels[0].name)  # never a half-copied wheel in the cache
        return out / wheels[0].name
