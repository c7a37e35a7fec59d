"""spark-submit entry point: ingest raw files into items / interactions / quarantine.

    spark-submit jobs/ingest.py --profile cluster [--set ingest.data_dir=...] [--run-date 2026-01-01]
"""

import sys

from hymirec_udfs.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("ingest"))
