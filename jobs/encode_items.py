"""spark-submit entry point: encode every item embedding into its residual codebook codes.

    spark-submit jobs/encode_items.py --profile cluster [--set key=value ...] [--run-date 2026-01-01]
"""

import sys

from hymirec_udfs.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("encode"))
