"""Real servers the tests start on 127.0.0.1 and stop again: an S3-compatible server (moto's
server mode) and a Spark standalone cluster (a master and two workers from the installed
pyspark). Also used by ``make cluster-demo`` (``python -m tests.services``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

BUCKET = "hymirec-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}; log {log}:\n"
                               f"{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 - 127.0.0.1 only
            return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error status: the server answers
                return
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; log {log}")


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1 with one bucket; :attr:`env` is what clients need."""

    port: int
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def s3_server(log_dir: Path, bucket: str = BUCKET) -> Iterator[S3Server]:
    """Start moto's server mode, create ``bucket``, set the standard AWS variables in
    ``os.environ`` (restored after) and yield it; the server is stopped on exit."""
    port = free_port()
    log = log_dir / "moto.log"
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true",
        # The pipeline is the tables' only writer here; with several writers delta-rs needs
        # a locking provider (storage.options: AWS_S3_LOCKING_PROVIDER=dynamodb).
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    try:
        _wait_http(f"http://127.0.0.1:{port}/", 60, proc, log)
        os.environ.update(env)
        import boto3

        boto3.client("s3").create_bucket(Bucket=bucket)
        yield S3Server(port, proc, env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


@dataclass
class Cluster:
    """A Spark standalone master and its workers (one process each)."""

    master_url: str
    master: subprocess.Popen
    workers: list[subprocess.Popen]
    work_dirs: list[Path]
    logs: Path

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker ``index`` and the executor JVM it started (a lost machine)."""
        proc = self.workers[index]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _spark_class_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1",
           "PYSPARK_PYTHON": sys.executable, "SPARK_NO_DAEMONIZE": "1", **(extra or {})}
    return env


@contextlib.contextmanager
def standalone_cluster(base: Path, workers: int = 2, cores: int = 1, memory: str = "3g") -> Iterator[Cluster]:
    """Start ``org.apache.spark.deploy.master.Master`` and ``workers`` ×
    ``org.apache.spark.deploy.worker.Worker`` on 127.0.0.1 with ``spark-class`` of the
    installed pyspark, each worker with its own work dir under ``base``; stop them all on
    exit (each in its own process group, so executors go too)."""
    home = spark_home()
    spark_class = str(home / "bin" / "spark-class")
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port, ui = free_port(), free_port()
    env = _spark_class_env()
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = logs / f"{name}.log"
        proc = subprocess.Popen([spark_class, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        procs.append(proc)
        return proc

    try:
        master = start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port",
                       str(port), "--webui-port", str(ui))
        _wait_http(f"http://127.0.0.1:{ui}/json/", 90, master, logs / "master.log")
        url = f"spark://127.0.0.1:{port}"
        work_dirs, worker_procs = [], []
        for i in range(workers):
            work = base / f"worker-{i}"
            work.mkdir(parents=True, exist_ok=True)
            work_dirs.append(work)
            worker_procs.append(start(f"worker-{i}", "org.apache.spark.deploy.worker.Worker", url, "--host",
                                      "127.0.0.1", "--cores", str(cores), "--memory", memory, "--work-dir",
                                      str(work), "--webui-port", str(free_port())))
        _wait_workers(ui, workers, master, logs)
        yield Cluster(url, master, worker_procs, work_dirs, logs)
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def _wait_workers(ui: int, want: int, master: subprocess.Popen, logs: Path, timeout: float = 90) -> None:
    import json

    deadline = time.time() + timeout
    while time.time() < deadline:
        state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5).read())  # noqa: S310
        alive = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
        if len(alive) >= want:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{want} workers did not register with the master within {timeout:.0f} s; logs in {logs}")


def spark_submit(master: str, args: list[str], env: dict[str, str], packages: list[str], conf: dict[str, str],
                 log: Path, timeout: float, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """``spark-submit --master <master> --packages ... --conf k=v ... <args>`` with its
    output in ``log``."""
    cmd = [str(spark_home() / "bin" / "spark-submit"), "--master", master]
    if packages:
        cmd += ["--packages", ",".join(packages)]
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    cmd += args
    with log.open("w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_spark_class_env(env), timeout=timeout,
                              cwd=cwd)


REPO = Path(__file__).resolve().parents[1]


def child_pytest(test_file: Path, env: dict[str, str], timeout: float = 1500,
                 python: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``test_file`` in a child pytest (its own JVM and Spark session) with ``env``
    added to this environment; the suites of the table layer run so per engine/storage,
    and the smoke test in another venv (``python``) with the oldest admitted MLflow."""
    return subprocess.run(
        [python or sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", str(test_file)],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


def run_pipeline_on_cluster(base: Path, *, profile: str = "local", engine: str = "spark", storage: str = "s3",
                            sets: tuple[str, ...] = (), run_date: str = "2026-01-01", timeout: float = 3600,
                            extra_args: tuple[str, ...] = (), conf: Optional[dict[str, str]] = None,
                            during=None, after=None) -> dict:
    """``spark-submit jobs/pipeline.py`` on a fresh standalone cluster (master + 2 workers),
    with the tables under ``s3://`` on a moto server (``storage="s3"``) or on local disk.

    ``during(cluster, proc_log)``, when given, runs in a thread while the application runs
    (the fault tests kill a worker from there); ``after(work_uri)`` runs once the application
    ended, while the servers still run (to inspect what it wrote), its value returned as
    ``"after"``.

    Returns:
        ``{"returncode", "result" (the last HYMIREC_RESULT), "wall_s", "log", "work_uri"}``.
    """
    import json
    import threading

    from hymirec_udfs.core.spark import delta_packages, ensure_java, s3a_packages

    ensure_java()
    base.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        packages = list(delta_packages()) if engine == "spark" else []
        if storage == "s3":
            server = stack.enter_context(s3_server(base / "s3"))
            env.update(server.env)
            work = f"s3://{BUCKET}/{base.name}-{engine}"
            packages += s3a_packages()
        else:
            work = str(base / f"work-{engine}")
        cluster = stack.enter_context(standalone_cluster(base / "cluster"))
        conf = {"spark.ui.enabled": "false", "spark.executor.memory": "2g", "spark.driver.memory": "3g",
                "spark.local.dir": str(base / "spark-local"), "spark.sql.shuffle.partitions": "4",
                "spark.log.level": "WARN", **(conf or {})}
        args = [str(REPO / "jobs" / "pipeline.py"), "--profile", profile, "--run-date", run_date,
                "--set", f"paths.work_dir={work}", "--set", f"paths.local_dir={base / 'local'}",
                "--set", f"storage.engine={engine}", "--set", "train.local_mode=false"]
        for item in sets:
            args += ["--set", item]
        args += list(extra_args)
        log = base / f"pipeline-{engine}-{storage}.log"
        start = time.perf_counter()
        worker = None
        if during is not None:
            worker = threading.Thread(target=during, args=(cluster, log), daemon=True)
            worker.start()
        proc = spark_submit(cluster.master_url, args, env, packages, conf, log, timeout, cwd=base)
        wall = time.perf_counter() - start
        if worker is not None:
            worker.join(60)
        inspected = after(work) if after is not None else None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("HYMIREC_RESULT ")]
    result = json.loads(lines[-1][len("HYMIREC_RESULT "):]) if lines else {}
    return {"returncode": proc.returncode, "result": result, "wall_s": round(wall, 1), "log": str(log),
            "work_uri": work, "after": inspected}


def main(argv: Optional[list[str]] = None) -> int:  # pragma: no cover - `make cluster-demo`
    import argparse

    parser = argparse.ArgumentParser(
        description="The pipeline on a local Spark standalone cluster (master + 2 workers on 127.0.0.1), "
                    "tables on an S3 server (moto) or local disk; servers are stopped at the end.")
    parser.add_argument("--base", default="hymirec-cluster", help="scratch dir: logs, worker dirs, local_dir")
    parser.add_argument("--profile", default="local")
    parser.add_argument("--engine", default="spark", choices=["spark", "delta-rs"])
    parser.add_argument("--storage", default="s3", choices=["s3", "local"])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more key=value overrides")
    opts = parser.parse_args(argv)
    out = run_pipeline_on_cluster(Path(opts.base).resolve(), profile=opts.profile, engine=opts.engine,
                                  storage=opts.storage, sets=tuple(opts.sets))
    result = out["result"]
    print(f"cluster run: engine={opts.engine} storage={opts.storage} work_dir={out['work_uri']} "
          f"status={result.get('status')} wall={out['wall_s']} s (spark-submit exit {out['returncode']})")
    for stage, status in (result.get("stages") or {}).items():
        print(f"  {stage:<24} {status}")
    print(f"log: {out['log']}")
    return 0 if out["returncode"] == 0 and result.get("status") == "success" else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
