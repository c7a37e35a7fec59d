"""Clean virtual environments for the tests that must not see this venv's extras.

A Databricks ML runtime brings Spark, torch, transformers, MLflow and the scientific stack;
a task adds the hymirec wheel (with its own requirements) and its declared libraries.
:func:`runtime_venv` builds that: a fresh ``python -m venv`` whose only inherited packages
are the **runtime set** (:data:`RUNTIME`, with everything they require), taken from this
venv through a read-only folder of links (installing torch again would download ~3 GB),
plus what ``pip install`` then adds on top. Packages outside the runtime set's closure —
the embedding model package, faiss, boto3, moto, pytest — are not there unless installed.

Built once per content and cached outside the clone (``$HYMIREC_VENV_CACHE``, default
``~/.cache/hymirec/venvs``), keyed by the versions it holds and what was asked, so CI does
not rebuild it every run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("HYMIREC_VENV_CACHE", Path.home() / ".cache" / "hymirec" / "venvs"))

#: what a Databricks ML runtime (17.x) ships; a task installs the rest
RUNTIME = ("pyspark", "delta-spark", "torch", "transformers", "mlflow", "numpy", "pandas", "pyarrow", "scipy",
           "scikit-learn", "matplotlib", "safetensors", "pyyaml")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, md.Distribution]:
    """The installed distributions ``roots`` need (transitively, extras left out), minus
    ``exclude`` (and what only they need)."""
    installed = {_norm(d.metadata["Name"]): d for d in md.distributions()}
    skip = {_norm(e) for e in exclude}
    found: dict[str, md.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo: list[tuple[str, str]] = [(_norm(r), "") for r in roots]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name in skip or name not in installed:
            continue
        seen.add((name, extra))
        found[name] = installed[name]
        for req in installed[name].requires or []:
            spec, _, marker = req.partition(";")
            wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if wanted and extra not in wanted:
                continue  # an extra nobody asked for
            if not wanted and extra:
                continue  # the base requirements were taken with the plain name
            if "platform_system" in marker and "Windows" in marker:
                continue
            match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
            if not match:
                continue
            dep = _norm(match.group(1))
            todo.append((dep, ""))
            todo.extend((dep, e.strip()) for e in (match.group(2) or "").split(",") if e.strip())
    return found


def _farm(dists: dict[str, md.Distribution], target: Path) -> None:
    """Links to the top-level files and folders of ``dists`` in ``target``, made read-only
    (a pip run in the venv can never remove what the links point at)."""
    target.mkdir(parents=True)
    for dist in dists.values():
        site = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source, link = site / top, target / top
            if top.endswith(".pth") or top == "__pycache__" or link.exists() or not source.exists():
                continue
            link.symlink_to(source)
    target.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)


def _pip(python: Path, *args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def runtime_venv(name: str, requirements: Iterable[str] = (), *, exclude: Iterable[str] = (),
                 no_deps: bool = False, constrained: bool = True) -> Path:
    """The python of a cached clean venv: the runtime set (minus ``exclude`` and what only
    it needs) linked from this venv, then ``pip install [-c constraints.txt]
    <requirements>`` (``--no-deps`` when asked). Returns ``<venv>/bin/python``."""
    requirements, exclude = sorted(requirements), sorted(_norm(e) for e in exclude)
    dists = closure(RUNTIME, exclude)
    home = cache_home(name, dists, requirements, no_deps=no_deps, constrained=constrained)
    python = home / "bin" / "python"
    if (home / ".complete").exists() and intact(home):
        return python
    if home.exists():
        _chmod_writable(home)
        shutil.rmtree(home)
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _farm(dists, home / "runtime")
    (site / "_hymirec_runtime.pth").write_text(str(home / "runtime") + "\n")
    if requirements:
        # CI's pins, except those of the excluded distributions (installed in another version)
        pins = home / "constraints.txt"
        pins.write_text("".join(line + "\n" for line in (REPO / "constraints.txt").read_text().splitlines()
                                if _norm(re.split(r"[ =<>!~;\[]", line.strip(), maxsplit=1)[0]) not in exclude))
        _pip(python, "install", "-q", *(["-c", str(pins)] if constrained else []),
             *(["--no-deps"] if no_deps else []), *requirements)
    (home / ".complete").write_text(name)
    return python


def cache_home(name: str, dists: dict[str, md.Distribution], requirements: list[str], *, no_deps: bool,
               constrained: bool) -> Path:
    """The cache folder of a venv: keyed by the python, the versions it links, the folders
    the links point into (a venv cached by a run from another checkout, another .venv path,
    links into files that may be gone), and what was asked of pip."""
    sites = sorted({str(Path(d.locate_file("")).resolve()) for d in dists.values()})
    key = json.dumps({"py": sys.version, "dists": sorted(f"{n}=={d.version}" for n, d in dists.items()),
                      "sites": sites, "requirements": requirements, "no_deps": no_deps, "constrained": constrained,
                      "constraints": (REPO / "constraints.txt").read_text()}, sort_keys=True)
    return CACHE / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def intact(home: Path) -> bool:
    """Whether a cached venv still works: its python runs, every link of its runtime folder
    resolves, and each distribution pip put in it has its files. A venv of the cache can
    lose files under it (a link's target removed with the .venv it pointed into, a cache
    pruned by hand); reusing it would fail later with an ImportError far from the cause
    (CI at 06bbcf3: ``No module named 'yaml'``, ``No module named 'pydantic'``)."""
    python = home / "bin" / "python"
    runtime = home / "runtime"
    if not python.exists() or not runtime.is_dir():
        return False
    if any(not link.exists() for link in runtime.iterdir()):  # exists() follows the link
        return False
    proc = subprocess.run([str(python), "-c", _CHECK_FILES], capture_output=True, text=True)
    return proc.returncode == 0


# every file a distribution of the venv's own site-packages records is still there
_CHECK_FILES = """
import importlib.metadata as md, sys, sysconfig
from pathlib import Path
site = Path(sysconfig.get_paths()["purelib"]).resolve()
for d in md.distributions(path=[str(site)]):
    for f in d.files or []:
        p = Path(d.locate_file(f))
        if not str(f).startswith("..") and p.suffix in (".py", ".so") and not p.exists():
            sys.exit(f"{d.metadata['Name']}: {f} missing")
"""


def _chmod_writable(root: Path) -> None:
    for folder, _, _ in os.walk(root):
        try:
            Path(folder).chmod(0o755)
        except OSError:
            pass


def install_to(python: Path, target: Path, requirements: Iterable[str]) -> list[str]:
    """Install into folder ``target`` only what ``requirements`` add to ``python``'s venv
    (pip's own resolution against what is there: a dry run's report, then ``--no-deps``),
    as a Databricks task's libraries add to its cluster. Returns the ``name==version``s."""
    requirements = list(requirements)
    if not requirements:
        return []
    report = target.parent / f"{target.name}.report.json"
    _pip(python, "install", "-q", "--dry-run", "--report", str(report), "-c", str(REPO / "constraints.txt"),
         *requirements)
    pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report.read_text())["install"]]
    if pins:
        _pip(python, "install", "-q", "--no-deps", "--target", str(target), *pins)
    return pins
