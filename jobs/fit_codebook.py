"""spark-submit entry point: fit the cosine residual codebook on a basepool sample of item embeddings.

    spark-submit jobs/fit_codebook.py --profile cluster [--set key=value ...] [--run-date 2026-01-01]
"""

import sys

from hymirec_udfs.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("fit-codebook"))
