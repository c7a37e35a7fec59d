"""Closed configuration choices, typed once.

Each choice is a :class:`Choice` (a ``StrEnum``): config validation checks the YAML value
against it (:data:`CONFIG_CHOICES`) and the code that acts on the value compares against
the same members, so a new option is added in exactly one place.
"""

from __future__ import annotations

from enum import StrEnum


class Choice(StrEnum):
    """A closed set of string options."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The allowed strings, in declaration order."""
        return tuple(member.value for member in cls)


class StorageEngine(Choice):
    """Which Delta engine writes the tables (``auto``: Spark's when its JVM has Delta)."""

    AUTO = "auto"
    SPARK = "spark"
    DELTA_RS = "delta-rs"


class IngestSource(Choice):
    """Raw input formats the ingest stage reads."""

    ML_100K = "ml-100k"
    ML_100K_GROUPLENS = "ml-100k-grouplens"
    ML_1M = "ml-1m"
    CSV = "csv"
    PARQUET = "parquet"
    SYNTHETIC = "synthetic"


class IngestMode(Choice):
    """``snapshot``: the raw files are the whole catalog and log (tables replaced);
    ``incremental``: the run date's increment is merged into the tables."""

    SNAPSHOT = "snapshot"
    INCREMENTAL = "incremental"


class RefitPolicy(Choice):
    """When ``fit_codebook`` fits a new codebook version.

    ``auto``: the first time for an embedding model, when the drift score trips
    ``codebook.drift_threshold``, or every ``codebook.refit_every_days``; ``always``: every
    run (forced); ``never``: keep the pinned codebook (health is still recorded)."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


class WarmStart(Choice):
    """``auto``: train from the champion's weights while its codebook version is current;
    ``never``: always train from scratch."""

    AUTO = "auto"
    NEVER = "never"


class Pooling(Choice):
    """How the per-token hidden states become one item vector."""

    MEAN = "mean"
    CLS = "cls"
    LAST_TOKEN = "last_token"


class ItemAdapter(Choice):
    """The trainable item side of the content models (HyMiRec, HLLM) used for ranking.

    ``none``: the frozen content embeddings; ``mlp``: ``e + MLP(e)`` (a residual MLP
    tower over the content, identity at initialisation, so unseen items are scored with
    it too); ``mlp_id``: that plus a per-item learned residual (an ID table, zero at
    initialisation; items added after training have none and fall back to the MLP).
    """

    NONE = "none"
    MLP = "mlp"
    MLP_ID = "mlp_id"


class Retrieval(Choice):
    """How ``recommend`` finds each user's top-K items."""

    EXACT = "exact"
    ANN = "ann"


class StoreDtype(Choice):
    """Embedding dtype of the item store directory."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"


class EmbedDtype(Choice):
    """Compute dtype of the content encoder (``auto``: bf16 on GPU, fp32 on CPU)."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class OnModelChange(Choice):
    """What the embed stage does with rows of another encoder."""

    REPLACE = "replace"
    KEEP = "keep"


class Metric(Choice):
    """How codes are chosen and residuals formed.

    ``COSINE`` is the paper's codebook (argmax cosine, projection residual, codes plus
    coefficients); ``EUCLIDEAN`` is the ablation (nearest centroid, ``r - c``, codes only).
    """

    COSINE = "cosine"
    EUCLIDEAN = "euclidean"


class SplitMode(Choice):
    """How validation and test targets are held out."""

    LEAVE_ONE_OUT = "leave_one_out"
    TIME_CUTOFF = "time_cutoff"


class Matching(Choice):
    """How DMIL assigns target groups to interests."""

    HUNGARIAN = "hungarian"
    MAX = "max"


class ModelType(Choice):
    """The stage-2 models: HyMiRec and the two baselines."""

    HYMIREC = "hymirec"
    SASREC = "sasrec"
    HLLM = "hllm"


class MergeMode(Choice):
    """How a user's interests are merged into one ranking."""

    MAX = "max"
    UNION = "union"


class Trainable(Choice):
    """Which content-LLM parameters stage 1 trains."""

    ALL = "all"
    LAST_LAYERS = "last_layers"
    NONE = "none"


# Config key -> its closed choice (checked by config validation at load time).
CONFIG_CHOICES: dict[str, type[Choice]] = {
    "storage.engine": StorageEngine,
    "ingest.source": IngestSource,
    "ingest.mode": IngestMode,
    "codebook.refit": RefitPolicy,
    "train.warm_start": WarmStart,
    "embed.pooling": Pooling,
    "embed.dtype": EmbedDtype,
    "embed.on_model_change": OnModelChange,
    "codebook.metric": Metric,
    "sequences.split": SplitMode,
    "dmil.matching": Matching,
    "train.model_type": ModelType,
    "model.item_adapter": ItemAdapter,
    "train.item_store_dtype": StoreDtype,
    "recommend.retrieval": Retrieval,
    "evaluate.merge": MergeMode,
    "stage1.trainable": Trainable,
}
