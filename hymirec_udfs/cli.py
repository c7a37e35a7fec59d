"""The ``hymirec`` command line and the entry point of every spark-submit job.

Usage::

    hymirec ingest | embed | fit-codebook | encode | build-sequences | train | evaluate
            | train-content-encoder  [--profile NAME] [--set key=value ...] [--run-date D]
    hymirec pipeline run [--from STAGE] [--to STAGE] [--force]
    hymirec config show
    hymirec tables
    hymirec report                 (latest evaluation metrics and report path)
    hymirec ablations              (HyMiRec and every ablation switch, paper Table 4 shape)
    hymirec schedule simulate --days N [--users U] [--drift-day K] [--remove-day K]
                                   (ML-100K replayed day by day with --run-date)

Every command, on success and on any error, ends with one machine-readable line
``HYMIREC_RESULT {json}`` (``status``; ``error`` when failed). Exit codes: 0 success,
1 a stage failed, 2 bad configuration or arguments (unknown key, unknown stage), 3 any
other error (its traceback on stderr). ``--log-level`` sets the progress log on stderr;
``--version`` prints the package version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from hymirec_udfs.core.config import ConfigError, dump_config, load_config


def stage_commands() -> list[str]:
    """The stage sub-commands, from the registry (pipeline stages, then on-demand ones)."""
    from hymirec_udfs.pipeline import all_stages

    return [spec.cli for spec in all_stages()]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", action="append", default=[],
                        help="config profile (conf/<name>.yaml) or YAML path; repeatable, applied in order")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (e.g. train.epochs=2); repeatable, applied last")
    parser.add_argument("--conf-dir", default=None, help="directory of base.yaml and the profiles")
    parser.add_argument("--run-date", default=None,
                        help="as-of date YYYY-MM-DD (e.g. Airflow's {{ ds }}): the run sees interactions up to the end"
                             " of it; incremental ingestion reads its increment")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="level of the progress log on stderr (default INFO)")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown command, missing argument, bad choice) also
    end with the ``HYMIREC_RESULT`` line, exit code :data:`EXIT_USAGE`; sub-parsers inherit it."""

    def error(self, message: str) -> Any:  # argparse's contract: never returns
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        _result({"command": self.prog.removeprefix("hymirec").strip() or "hymirec", "status": "failed",
                 "error": message})
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = _Parser(prog="hymirec", description="HyMiRec batch ETL on Spark")
    from hymirec_udfs import __version__

    parser.add_argument("--version", action="version", version=f"hymirec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in stage_commands():
        stage = sub.add_parser(name, help=f"run the {name} stage")
        _common(stage)
        if name == "ablations":
            stage.add_argument("--variants", default="", help="comma-separated subset of variants (default: all)")
    pipe = sub.add_parser("pipeline", help="run the stages in order")
    pipe_sub = pipe.add_subparsers(dest="action", required=True)
    run = pipe_sub.add_parser("run", help="run the pipeline, skipping up-to-date stages")
    _common(run)
    run.add_argument("--from", dest="from_stage", default=None)
    run.add_argument("--to", dest="to_stage", default=None)
    run.add_argument("--force", action="store_true", help="re-run stages even when up to date")
    conf = sub.add_parser("config", help="configuration")
    conf_sub = conf.add_subparsers(dest="action", required=True)
    _common(conf_sub.add_parser("show", help="print the resolved configuration"))
    _common(sub.add_parser("tables", help="list tables with version and row count"))
    _common(sub.add_parser("report", help="print the latest evaluation metrics and the report path"))
    sched = sub.add_parser("schedule", help="daily schedules")
    sched_sub = sched.add_subparsers(dest="action", required=True)
    sim = sched_sub.add_parser("simulate", help="replay MovieLens-100K as daily increments, one pipeline run per day")
    _common(sim)
    sim.add_argument("--days", type=int, default=4, help="days after the bootstrap increment (default 4)")
    sim.add_argument("--users", type=int, default=0, help="keep the first U users (default: all)")
    sim.add_argument("--drift-day", type=int, default=0, help="day that brings out-of-domain items (0: none)")
    sim.add_argument("--remove-day", type=int, default=0, help="day that removes the most popular item (0: none)")
    return parser


def _profiles(args: argparse.Namespace) -> list[str]:
    names: list[str] = []
    for item in args.profile:
        names.extend(p for p in item.split(",") if p)
    if not names and os.environ.get("HYMIREC_PROFILE"):
        names = os.environ["HYMIREC_PROFILE"].split(",")
    return names


def _result(payload: dict[str, Any]) -> None:
    print("HYMIREC_RESULT " + json.dumps(payload, default=str, sort_keys=True), flush=True)


#: Exit codes: success, a stage failed, bad configuration or arguments, any other error.
EXIT_OK, EXIT_STAGE_FAILED, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the process exit code (:data:`EXIT_OK` ... :data:`EXIT_ERROR`).

    Every command, on success and on any error, ends with one ``HYMIREC_RESULT {json}``
    line on stdout (``status`` and, when failed, ``error``); tracebacks of unexpected errors
    go to stderr above it.
    """
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    command = args.command + (f" {args.action}" if getattr(args, "action", None) else "")
    t0 = time.perf_counter()
    try:
        cfg = load_config(_profiles(args), args.overrides, args.conf_dir)
        if getattr(args, "run_date", None):
            import datetime as dt

            try:
                dt.date.fromisoformat(args.run_date)
            except ValueError:
                raise ConfigError(f"--run-date {args.run_date!r} is not a date (YYYY-MM-DD)") from None
        if args.command == "pipeline":
            from hymirec_udfs.pipeline import stage_by_cli

            for name in (args.from_stage, args.to_stage):
                if name:
                    stage_by_cli(name)  # an unknown stage fails before a session starts
    except (ConfigError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"hymirec: {'configuration' if isinstance(exc, ConfigError) else 'usage'} error: {message}",
              file=sys.stderr)
        _result({"command": command, "status": "failed", "error": str(message)})
        return EXIT_USAGE
    try:
        return _run(args, cfg, command, t0)
    except Exception as exc:  # noqa: BLE001 - reported on the result line, then the exit code
        import traceback

        traceback.print_exc()
        _result({"command": command, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return EXIT_ERROR


def _configure_logging(level: str) -> None:
    """The package's progress log at ``level`` on stderr; other libraries' at WARNING."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hymirec_udfs").setLevel(getattr(logging, level.upper()))


def _run(args: argparse.Namespace, cfg: Any, command: str, t0: float) -> int:
    if args.command == "config":
        print(dump_config(cfg))
        _result({"command": command, "status": "success", "profile": cfg.profile})
        return EXIT_OK

    from hymirec_udfs.core.spark import get_spark
    from hymirec_udfs.core.stage_api import StageFailed
    from hymirec_udfs.pipeline import run_pipeline, run_stage

    spark = get_spark(cfg)
    if args.run_date:
        os.environ["HYMIREC_RUN_DATE"] = args.run_date
    try:
        if args.command == "tables":
            from hymirec_udfs.core.tables import get_table_store

            store = get_table_store(spark, cfg)
            print(f"{'table':<18} {'version':>8} {'rows':>12}  location   (engine: {store.engine})")
            tables = {}
            for info in store.list_tables():
                version = "-" if info.version is None else str(info.version)
                rows = "-" if info.rows is None else f"{info.rows:,}"
                print(f"{info.name:<18} {version:>8} {rows:>12}  {info.location}")
                tables[info.name] = {"version": info.version, "rows": info.rows}
            _result({"command": command, "status": "success", "engine": store.engine, "tables": tables})
            return EXIT_OK
        if args.command == "schedule":
            from hymirec_udfs.schedule import simulate

            reports = simulate(spark, cfg, days=args.days, users=args.users, drift_day=args.drift_day,
                               remove_day=args.remove_day)
            _result({"command": command, "status": "success", "days": [r.__dict__ for r in reports]})
            return EXIT_OK
        if args.command == "report":
            from hymirec_udfs.evaluation.report import print_latest

            print(print_latest(spark, cfg))
            _print_recommendation_sample(spark, cfg)
            _result({"command": command, "status": "success"})
            return EXIT_OK
        if getattr(args, "variants", ""):
            os.environ["HYMIREC_ABLATION_VARIANTS"] = args.variants
        if args.command == "pipeline":
            jobs = run_pipeline(spark, cfg, from_stage=args.from_stage, to_stage=args.to_stage, force=args.force)
            print(pipeline_summary(jobs, time.perf_counter() - t0))
            _result({"command": command, "status": "success",
                     "stages": {j.stage: ("skipped" if j.skipped else j.status) for j in jobs},
                     "wall_s": round(time.perf_counter() - t0, 1), "spark": spark_settings(spark)})
            return EXIT_OK
        job = run_stage(spark, cfg, args.command)
        print(job_summary(job))
        _result({"command": command, "stage": job.stage, "status": job.status, "run_id": job.run_id,
                 "mlflow_run_id": job.mlflow_run_id, "rows": job.row_counts, "outputs": job.output_versions,
                 "wall_s": round(job.wall_s, 1), "spark": spark_settings(spark)})
        return EXIT_OK
    except StageFailed as exc:
        print(f"hymirec: {exc}", file=sys.stderr)
        _result({"command": command, "status": "failed", "stage": exc.stage, "error": str(exc.error)})
        return EXIT_STAGE_FAILED


def _print_recommendation_sample(spark: Any, cfg: Any) -> None:
    """The latest as-of date's serving tables in a few lines (after ``hymirec report``)."""
    from pyspark.sql import functions as F

    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.tables import get_table_store
    from hymirec_udfs.recommend.sample import sample_text

    store = get_table_store(spark, cfg)
    if not store.exists(schemas.RECOMMENDATIONS):
        return
    latest = store.read(schemas.RECOMMENDATIONS).agg(F.max(schemas.AS_OF_DATE).alias("d")).first()["d"]
    if latest is None:
        return
    users = store.read(schemas.RECOMMENDATIONS).where(F.col(schemas.AS_OF_DATE) == latest) \
        .select(schemas.USER_ID).distinct().count()
    print(f"\nrecommendations as of {latest}: {users} users (table 'recommendations', 'user_interests')")
    print(sample_text(spark, cfg, latest.isoformat()))


# Settings an operator checks first when a scheduled job misbehaves (reported per run).
REPORTED_SPARK_CONF = ("spark.master", "spark.app.name", "spark.sql.shuffle.partitions",
                       "spark.sql.execution.arrow.maxRecordsPerBatch", "spark.sql.session.timeZone",
                       "spark.driver.maxResultSize")


def spark_settings(spark: Any) -> dict[str, Optional[str]]:
    """The effective values of :data:`REPORTED_SPARK_CONF` in this session."""
    return {key: spark.conf.get(key, None) for key in REPORTED_SPARK_CONF}


def job_summary(job: Any) -> str:
    """Readable summary of one stage run."""
    lines = [f"stage {job.stage}: {job.status} in {job.wall_s:.1f}s (run {job.run_id})"]
    for name, count in job.row_counts.items():
        lines.append(f"  {name:<24} {count:>12,}")
    for name, version in job.output_versions.items():
        lines.append(f"  table {name:<18} version {version}")
    for key, value in job.summary.items():
        if not isinstance(value, (dict, list)) and "\n" not in str(value):
            lines.append(f"  {key:<24} {value}")
    return "\n".join(lines)


def pipeline_summary(jobs: Sequence[Any], wall_s: float) -> str:
    """Readable summary of a pipeline run."""
    lines = ["", f"pipeline finished in {wall_s:.1f}s", f"  {'stage':<22} {'status':<8} {'wall_s':>7}  rows"]
    for job in jobs:
        status = "skipped" if job.skipped else job.status
        rows = ", ".join(f"{k}={v:,}" for k, v in job.row_counts.items())
        lines.append(f"  {job.stage:<22} {status:<8} {job.wall_s:>7.1f}  {rows}")
    return "\n".join(lines)


def job_main(stage: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``jobs/<stage>.py`` (spark-submit): the stage command with its options."""
    return main([stage, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
