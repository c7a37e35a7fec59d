"""spark-submit entry point: embed new/changed catalog items with the content LLM.

    spark-submit --conf spark.executor.resource.gpu.amount=1 --conf spark.task.resource.gpu.amount=1 \\
        jobs/embed_items.py --profile cluster
"""

import sys

from hymirec_udfs.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("embed"))
