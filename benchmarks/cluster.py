"""Wall time of the whole pipeline per (Spark mode, Delta engine, storage), same data and
config (``conf/ci-tiny.yaml`` on top of ``local`` unless ``--profile``), measured in one run.

Usage (from the repository root)::

    python benchmarks/cluster.py [--quick] [--profile local,ci-tiny] [--only local/delta-rs/disk ...]

Combinations (``mode/engine/storage``):

* ``local/delta-rs/disk`` - the baseline: ``hymirec pipeline run`` in the embedded
  ``local[2]`` session, delta-rs tables on local disk (``make demo``'s setup);
* ``local/spark/disk`` - the same with Spark's Delta;
* ``cluster/delta-rs/s3``, ``cluster/spark/s3`` - ``spark-submit jobs/pipeline.py`` on a
  standalone cluster (master + 2 workers x 1 core on 127.0.0.1, started here), tables,
  reports and MLflow artefacts on ``s3://`` (moto's server on 127.0.0.1).

``--quick`` runs the baseline and ``cluster/delta-rs/disk`` up to ``embed_items`` only.
Each run's per-stage times come from its ``HYMIREC_RESULT`` line. The S3 server is moto
(a Python process answering every request itself): its per-request cost is not AWS's, so
compare the object-storage rows with each other more than with local disk.

Writes ``benchmarks/results/cluster.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "benchmarks" / "results" / "cluster.json"
ALL = ["local/delta-rs/disk", "local/spark/disk", "cluster/delta-rs/s3", "cluster/spark/s3"]
STAGE_LINE = re.compile(r"^\[\d+/\d+\] (\S+)\s+done in\s+([\d.]+)s")


def _stage_times(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in map(STAGE_LINE.match, text.splitlines()) if m}


def run_local(base: Path, engine: str, storage: str, profile: str, extra: list[str]) -> dict:
    """``hymirec pipeline run`` in the embedded local session (a fresh process)."""
    from tests.services import BUCKET, s3_server

    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        if storage == "s3":
            env.update(stack.enter_context(s3_server(base / "s3")).env)
            work = f"s3://{BUCKET}/{base.name}"
        else:
            work = str(base / "work")
        cmd = [sys.executable, "-m", "hymirec_udfs.cli", "pipeline", "run", "--profile", profile,
               "--run-date", "2026-01-01", "--set", f"paths.work_dir={work}",
               "--set", f"paths.local_dir={base / 'local'}",
               "--set", f"storage.engine={engine}", *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=5400)
        wall = time.perf_counter() - start
    (base / "pipeline.log").write_text(proc.stdout + proc.stderr)
    ok = proc.returncode == 0 and '"status": "success"' in proc.stdout
    return {"wall_s": round(wall, 1), "ok": ok, "stages_s": _stage_times(proc.stdout)}


def run_cluster(base: Path, engine: str, storage: str, profile: str, extra: list[str]) -> dict:
    """``spark-submit jobs/pipeline.py`` on a fresh standalone cluster (2 training ranks)."""
    from tests.services import run_pipeline_on_cluster

    out = run_pipeline_on_cluster(base, profile=profile, engine=engine, storage=storage,
                                  sets=("train.num_processes=2",), extra_args=tuple(extra))
    text = Path(out["log"]).read_text(errors="replace")
    ok = out["returncode"] == 0 and out["result"].get("status") == "success"
    return {"wall_s": out["wall_s"], "ok": ok, "stages_s": _stage_times(text)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", default="local,ci-tiny")
    parser.add_argument("--only", nargs="*", default=None, help=f"some of {ALL}")
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()
    combos = ["local/delta-rs/disk", "cluster/delta-rs/disk"] if opts.quick else (opts.only or ALL)
    extra = ["--to", "embed_items"] if opts.quick else []
    rows = {}
    with tempfile.TemporaryDirectory(prefix="hymirec-bench-cluster-") as tmp:
        for combo in combos:
            mode, engine, storage = combo.split("/")
            base = Path(tmp) / combo.replace("/", "-")
            base.mkdir(parents=True)
            runner = run_local if mode == "local" else run_cluster
            rows[combo] = runner(base, engine, "s3" if storage == "s3" else "local", opts.profile, extra)
            print(f"{combo:<22} {'ok' if rows[combo]['ok'] else 'FAILED':<6} {rows[combo]['wall_s']:>7.1f} s  "
                  f"{rows[combo]['stages_s']}", flush=True)
    base_wall = rows[combos[0]]["wall_s"]
    for row in rows.values():
        row["vs_baseline"] = round(row["wall_s"] / base_wall, 2) if base_wall else None
    result = {
        "date": dt.date.today().isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
        "profile": opts.profile, "quick": opts.quick, "baseline": combos[0], "runs": rows,
        "cluster": "standalone master + 2 workers x 1 core, 2g executors, on 127.0.0.1",
        "s3": "moto server mode on 127.0.0.1 (Python; per-request cost is not AWS's)",
    }
    if not opts.quick:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(r["ok"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
