"""Shared infrastructure: typed config and closed choices, table schemas and column names,
the Spark session factory, the table store (both Delta engines), MLflow tracking,
``job_runs`` lineage and the stage API. Imports nothing else from the package.
"""
