"""The project wheel logged with a model: exactly the running code, built once per content."""

from __future__ import annotations

import zipfile
from pathlib import Path

from hymirec_udfs.recommend.wheel import project_wheel


def test_wheel_holds_the_package_and_its_conf_and_is_cached_by_content(tmp_path: Path) -> None:
    import hymirec_udfs

    wheel = project_wheel(tmp_path / "cache")
    assert wheel.name.startswith("hymirec-0.1.0+g") and wheel.name.endswith("-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hymirec_udfs/recommend/pyfunc.py", "hymirec_udfs/conf/base.yaml", "hymirec_udfs/conf/__init__.py",
            "hymirec_udfs/cli.py"} <= names
    assert not any("__pycache__" in n for n in names)
    # the wheel's copy of a module is byte-identical to the running one
    package = Path(hymirec_udfs.__file__).parent
    own = (package / "recommend" / "wheel.py").read_bytes()
    assert zipfile.ZipFile(wheel).read("hymirec_udfs/recommend/wheel.py") == own
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Requires-Dist: torch" in text and "Requires-Dist: pyspark" not in text  # no extras
    # a second call is a cache hit (same file, not rebuilt)
    mtime = wheel.stat().st_mtime_ns
    again = project_wheel(tmp_path / "cache")
    assert again == wheel and again.stat().st_mtime_ns == mtime
    assert not list((tmp_path / "cache").rglob("*.partial"))
