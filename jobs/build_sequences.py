"""spark-submit entry point: build train/valid/test sequence samples from interactions.

    spark-submit jobs/build_sequences.py --profile cluster
"""

import sys

from hymirec_udfs.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("build-sequences"))
