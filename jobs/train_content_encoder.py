"""spark-submit entry point: optional stage 1: fine-tune the content LLM (runs before embed_items).

    spark-submit --conf spark.executor.resource.gpu.amount=1 --conf spark.task.resource.gpu.amount=1 \\
        jobs/train_content_encoder.py --profile cluster [--set key=value ...] [--run-date 2026-01-01]
"""

import sys

from hymirec_udfs.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train-content-encoder"))
