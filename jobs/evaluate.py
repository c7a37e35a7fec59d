"""spark-submit entry point: offline evaluation: exact full-catalog scoring, metrics tables and report.

    spark-submit jobs/evaluate.py --profile cluster [--set key=value ...] [--run-date 2026-01-01]
"""

import sys

from hymirec_udfs.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evaluate"))
