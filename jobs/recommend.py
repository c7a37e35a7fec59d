"""spark-submit entry point: user interests and top-K recommendations for the run's as-of date.

    spark-submit jobs/recommend.py --profile cluster [--set key=value ...] [--run-date 2026-01-01]
"""

import sys

from hymirec_udfs.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("recommend"))
