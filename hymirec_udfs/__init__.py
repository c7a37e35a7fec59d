"""HyMiRec on Spark: batch feature and embedding ETL for the hybrid multi-interest recommender.

Importing the package is cheap: torch, transformers, mlflow and pyspark are imported inside
the modules (and functions) that need them. Entry points: :mod:`hymirec_udfs.cli` (the
``hymirec`` command), :func:`hymirec_udfs.pipeline.run_stage` / ``run_pipeline``.
"""

__version__ = "0.1.0"
