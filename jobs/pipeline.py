"""spark-submit entry point for the whole pipeline in one application (cron, a standalone
cluster, ``make cluster-demo``); schedulers that run stage by stage use the other jobs.

    spark-submit jobs/pipeline.py --profile cluster [--set paths.work_dir=s3://bucket/hymirec] [--run-date 2026-01-01]
"""

import sys

from hymirec_udfs.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "run", *sys.argv[1:]]))
