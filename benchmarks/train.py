"""Benchmark stage-2 training throughput: 1 process against 2 DDP (gloo) processes.

Run from the repository root::

    python benchmarks/train.py            # 60 optimizer steps per measurement, 3 repeats
    python benchmarks/train.py --quick    # 16 steps, 2 repeats: under 3 minutes on 2 cores

What it measures, on a seeded synthetic catalog and sequences table shaped like the
``local`` profile's MovieLens-100K run:

- catalog: N = 1682 items, D = 384 unit embeddings, a 3 x 32 cosine residual codebook
  (random unit centroids, random valid codes and positive coefficients: throughput does
  not depend on the codebook's quality);
- sequences: 943 users with ML-100K-like history lengths (20 + lognormal, median 66,
  popularity-skewed items, no repeats per user), one ``sequences`` row per user
  (:func:`hymirec_udfs.sequences.samples.user_row`), cut into samples by the loader with the
  ``local`` sequence settings (leave-one-out, 20 recent items, long history up to 100, 4
  targets, the 50 most recent cut points per user): 39.9k training samples with a mean
  long history of 47.5 items (ML-100K itself: 38,762 samples, 48.9 items), in 4 Parquet
  files with the ``sequences`` schema;
- model / DMIL / train settings of the ``local`` profile (HyMiRec, batch 128 per rank),
  with ``epochs=1``, a fixed ``max_steps``, no validation and no periodic checkpoints.

Each measurement runs :func:`hymirec_udfs.recommender.train.train` in freshly spawned processes
through :func:`hymirec_udfs.recommender.train.train_local_processes` (``1`` process: no process
group; ``2``: DDP over gloo, as TorchDistributor's local mode), one torch thread per
process. The figure is the ``samples_per_s`` ``train`` returns: samples of all ranks over
the wall time of the training loop, which excludes process start, imports, data loading,
model build and process-group set-up, and includes the first (cold) step and the one
checkpoint written when ``max_steps`` stops the run (a few MB for this model). 1- and
2-process runs are interleaved and repeated; the best of each is kept because the 2-core
machine is shared with other work (the load average is recorded around every run).

With CUDA (never on the CPU dev machines) it also times a TinyLlama-1.1B-shaped HyMiRec
(``local`` + ``gpu-tinyllama`` profiles, bf16 autocast, AdamW) in one process on the same
data and reports LLM tokens/s (``n_c + recent + s`` ``inputs_embeds`` tokens per sample)
and MFU = 6 x LLM parameters x tokens/s / bf16 dense peak (989 TFLOP/s on H100/H200;
attention and the lightweight encoder are not counted).

Results go to ``benchmarks/results/train.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Run as a script from a checkout: make the package importable without installing.
    sys.path.insert(0, str(REPO_ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from hymirec_udfs.core import schemas  # noqa: E402
from hymirec_udfs.core.config import load_config  # noqa: E402
from hymirec_udfs.recommender.models import TINYLLAMA_1_1B_SIZES  # noqa: E402
from hymirec_udfs.recommender.item_store import ItemStore  # noqa: E402
from hymirec_udfs.core.shards import user_shards  # noqa: E402
from hymirec_udfs.sequences.samples import cut_samples, user_row  # noqa: E402
from hymirec_udfs.recommender.train import train_local_processes  # noqa: E402

RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "train.json"

# ML-100K under the local profile (943 users, 50 most recent cut points each): the
# number of training rows build_sequences writes.
ML100K_TRAIN_SAMPLES = 38_762
N_ITEMS, DIM, CODEBOOK_LAYERS, CODEBOOK_K = 1682, 384, 3, 32
N_USERS = 943
N_FILES = 4
# bf16 dense peak (no sparsity) by GPU name substring.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# Synthetic data --------------------------------------------------------------------------


def make_item_store(seed: int = 0) -> ItemStore:
    """ML-100K-shaped catalog: unit embeddings and a random but valid 3 x 32 codebook."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.vstack([np.zeros((1, DIM), np.float32), emb])
    centroids = rng.normal(size=(CODEBOOK_LAYERS, CODEBOOK_K, DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=2, keepdims=True)
    codes = rng.integers(0, CODEBOOK_K, size=(N_ITEMS + 1, CODEBOOK_LAYERS))
    codes[0] = 0
    coefs = rng.uniform(0.05, 1.0, size=(N_ITEMS + 1, CODEBOOK_LAYERS)).astype(np.float32)
    coefs[0] = 0.0
    return ItemStore([str(i + 1) for i in range(N_ITEMS)], emb, codes, coefs, centroids, codebook_metric="cosine")


def write_sequences(directory: Path, seq_cfg: Any, seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    """Sequences Parquet files for ML-100K-like users; returns the paths and their stats."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(20 + rng.lognormal(3.9, 1.6, N_USERS)), 20, 737).astype(int)
    popularity = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    popularity /= popularity.sum()
    item_perm = rng.permutation(N_ITEMS) + 1  # which item id is how popular
    rows: list[dict] = []
    samples: list[dict] = []
    for u, length in enumerate(lengths):
        items = [str(i) for i in item_perm[rng.choice(N_ITEMS, int(length), replace=False, p=popularity)]]
        row = user_row(str(u + 1), items, list(range(int(length))), list(range(int(length))), seq_cfg)
        if row is not None:
            row["shard"] = int(user_shards([row["user_id"]])[0])
            rows.append(row)
            samples.extend(cut_samples(row, seq_cfg, ("train",)))
    schema = schemas.arrow_schema(schemas.SEQUENCES)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in range(N_FILES):
        path = directory / f"part-{p:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[p::N_FILES], schema=schema), path)
        paths.append(str(path))
    stats = {
        "users": N_USERS,
        "history_len_median": float(np.median(lengths)),
        "history_len_mean": float(lengths.mean()),
        "rows": len(rows),
        "train_samples": len(samples),
        "long_len_mean_train": float(np.mean([len(r["long_ids"]) for r in samples])),
    }
    return paths, stats


# CPU measurement -------------------------------------------------------------------------


def run_once(num_processes: int, kwargs: dict[str, Any], workdir: Path, tag: str) -> dict[str, Any]:
    """One training run in fresh processes; the samples/s ``train`` reports and context."""
    ckpt = workdir / f"ckpt-{tag}"  # fresh: an existing last.pt would be resumed
    load_before = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    results = train_local_processes(num_processes, checkpoint_dir=str(ckpt), **kwargs)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    res = results[0]
    expected = kwargs["train_cfg"].max_steps
    if res["steps"] != expected:
        raise RuntimeError(f"{tag}: ran {res['steps']} steps, expected {expected} (too little data?)")
    return {
        "processes": num_processes,
        "samples_per_s": float(res["samples_per_s"]),
        "steps": int(res["steps"]),
        "loop_seconds": res["steps"] * kwargs["train_cfg"].batch_size * num_processes / res["samples_per_s"],
        "wall_seconds_incl_startup": wall,
        # CPU of the spawned processes, startup included: cpu / wall far below the
        # process count means the run was starved by other load.
        "cpu_seconds_incl_startup": cpu,
        "cpu_cores_used_avg": cpu / wall if wall > 0 else None,
        "load_1m_before": load_before,
        "load_1m_after": os.getloadavg()[0],
    }


# GPU measurement -------------------------------------------------------------------------


def gpu_bench(store: ItemStore, files: list[str], steps: int, warmup: int = 3, *, device_name: str = "cuda",
              sizes: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """TinyLlama-1.1B-shaped HyMiRec on one GPU: tokens/s and MFU of the LLM part.

    ``device_name="cpu"`` with small ``sizes`` checks the code path without a GPU.
    """
    from hymirec_udfs.recommender.dmil import sample_negatives
    from hymirec_udfs.recommender.models import build_model, model_loss
    from hymirec_udfs.recommender.data import SequenceDataset, epoch_batches
    from hymirec_udfs.training.optim import build_optimizer

    cfg = load_config(["local", "gpu-tinyllama"])
    mcfg = dataclasses.replace(cfg.model, **(sizes or TINYLLAMA_1_1B_SIZES))
    dmil, tcfg, seq = cfg.dmil, cfg.train, cfg.sequences
    device = torch.device(device_name)
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    model = build_model("hymirec", mcfg, store, dmil_cfg=dmil, max_long=seq.max_long,
                        max_recent=seq.recent_window).to(device)
    model.train()
    llm_params = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, tcfg)
    ds = SequenceDataset(files, store, split="train", max_long=seq.max_long, recent_window=seq.recent_window,
                         window_targets=seq.window_targets, stride=seq.stride,
                         max_samples_per_user=seq.max_samples_per_user)
    bsz = tcfg.batch_size
    batches = epoch_batches(ds.long_lengths, bsz, np.random.default_rng(0), tcfg.bucket_batches)
    gen = torch.Generator().manual_seed(0)

    def step(rows: np.ndarray) -> None:
        batch = ds.collate(rows).to(device)
        neg = sample_negatives(store.n_items, dmil.negatives, gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = model_loss(model, batch, dmil, neg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()

    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    for b in range(warmup):
        step(batches[b % len(batches)])
    sync()
    t0 = time.perf_counter()
    samples = 0
    for b in range(warmup, warmup + steps):
        rows = batches[b % len(batches)]
        step(rows)
        samples += len(rows)
    sync()
    elapsed = time.perf_counter() - t0
    tokens_per_sample = mcfg.coarse_queries + seq.recent_window + mcfg.interests
    tokens_per_s = samples / elapsed * tokens_per_sample
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return {
        "gpu_samples_per_s": samples / elapsed,
        "gpu_tokens_per_s": tokens_per_s,
        "gpu_mfu": 6 * llm_params * tokens_per_s / peak if peak else None,
        "gpu_llm_params": llm_params,
        "gpu_peak_flops": peak,
        "gpu_batch_size": bsz,
        "gpu_steps": steps,
        "gpu_tokens_per_sample": tokens_per_sample,
        "gpu_peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
    }


# Main ------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 steps, 2 repeats (under 3 minutes)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (best kept)")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per rank per step")
    args = parser.parse_args(argv)
    steps = args.steps or (16 if args.quick else 60)
    repeats = args.repeats or (2 if args.quick else 3)
    cuda = torch.cuda.is_available()
    t_all = time.perf_counter()
    load_start = list(os.getloadavg())

    cfg = load_config(["local"])
    train_cfg = dataclasses.replace(
        cfg.train, epochs=1, max_steps=steps, batch_size=args.batch_size, eval_every_epoch=False,
        checkpoint_every=0, torch_threads=1, use_gpu=False,
    )
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        store = make_item_store()
        store_path = str(work / "item_store.npz")
        store.save(store_path)
        files, data_stats = write_sequences(work / "sequences", cfg.sequences)
        data_seconds = time.perf_counter() - t0
        if data_stats["train_samples"] < 2 * steps * args.batch_size:
            raise SystemExit(f"{data_stats['train_samples']} training samples are too few for {steps} steps "
                             f"of 2 x {args.batch_size}")
        kwargs = dict(
            model_type="hymirec", model_cfg=cfg.model, dmil_cfg=cfg.dmil, train_cfg=train_cfg,
            item_store_path=store_path, train_files=files, valid_files=(),
            max_long=cfg.sequences.max_long, recent_window=cfg.sequences.recent_window,
            window_targets=cfg.sequences.window_targets, stride=cfg.sequences.stride,
            max_samples_per_user=cfg.sequences.max_samples_per_user, bucket_batches=cfg.train.bucket_batches,
        )
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for r in range(repeats):  # interleaved so drifting load hits both alike
            for n in (1, 2):
                run = run_once(n, kwargs, work, f"{n}p-{r}")
                runs[n].append(run)
                print(f"  run {r + 1}/{repeats}, {n} proc: {run['samples_per_s']:8.1f} samples/s "
                      f"(loop {run['loop_seconds']:.1f} s, wall {run['wall_seconds_incl_startup']:.1f} s, "
                      f"{run['cpu_cores_used_avg']:.2f} cores used, "
                      f"load {run['load_1m_before']:.2f} -> {run['load_1m_after']:.2f})", flush=True)
        gpu: dict[str, Any] = {"gpu_mfu": None, "gpu_tokens_per_s": None}
        if cuda:
            try:
                gpu.update(gpu_bench(store, files, steps=10 if args.quick else 30))
            except Exception as exc:  # keep the CPU figures when the GPU path fails
                gpu["gpu_error"] = f"{type(exc).__name__}: {exc}"

    sps1 = max(r["samples_per_s"] for r in runs[1])
    sps2 = max(r["samples_per_s"] for r in runs[2])
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "samples_per_s_1proc": sps1,
        "samples_per_s_2proc": sps2,
        "scaling_efficiency": sps2 / (2 * sps1),
        "gpu_mfu": gpu.pop("gpu_mfu"),
        "gpu_tokens_per_s": gpu.pop("gpu_tokens_per_s"),
        "epoch_seconds_ml100k_estimate": ML100K_TRAIN_SAMPLES / sps2,
        "epoch_seconds_ml100k_estimate_1proc": ML100K_TRAIN_SAMPLES / sps1,
        "ml100k_train_samples": ML100K_TRAIN_SAMPLES,
        "samples_per_s_1proc_runs": [r["samples_per_s"] for r in runs[1]],
        "samples_per_s_2proc_runs": [r["samples_per_s"] for r in runs[2]],
        "steps_per_measurement": steps,
        "repeats": repeats,
        "batch_size_per_rank": args.batch_size,
        "torch_threads_per_process": 1,
        "n_items": N_ITEMS,
        "dim": DIM,
        "codebook_layers": CODEBOOK_LAYERS,
        "codebook_k": CODEBOOK_K,
        "synthetic_train_samples": data_stats["train_samples"],
        "synthetic_users": data_stats["users"],
        "synthetic_long_len_mean": data_stats["long_len_mean_train"],
        "max_long": cfg.sequences.max_long,
        "recent_window": cfg.sequences.recent_window,
        "window_targets": cfg.sequences.window_targets,
        "negatives_per_rank": cfg.dmil.negatives,
        "model": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "llm_checkpoint"},
        "timing": "train()'s samples_per_s: training-loop wall time, startup/data load/model build excluded",
        "runs": {"1proc": runs[1], "2proc": runs[2]},
        "data_build_seconds": data_seconds,
        "total_seconds": time.perf_counter() - t_all,
        **gpu,
        "machine": {
            "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "loadavg": {"start": load_start, "end": list(os.getloadavg())},
        },
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


def print_table(r: dict[str, Any]) -> None:
    def fmt(x: Any) -> str:
        return "n/a" if x is None else f"{x:,.1f}" if isinstance(x, float) else str(x)

    m = r["machine"]
    print()
    print(f"Stage-2 training throughput [{r['mode']}]: HyMiRec local profile, {r['steps_per_measurement']} steps x "
          f"batch {r['batch_size_per_rank']}/rank, best of {r['repeats']}, 1 torch thread/process")
    print(f"  catalog {r['n_items']} x {r['dim']}, codebook {r['codebook_layers']}x{r['codebook_k']}; "
          f"{r['synthetic_train_samples']:,} synthetic train samples (mean long history "
          f"{r['synthetic_long_len_mean']:.0f})")
    print(f"  {'configuration':<34} {'samples/s (best)':>17}   runs")
    for key, label in (("1proc", "1 process"), ("2proc", "2 processes (DDP gloo)")):
        runs = ", ".join(f"{x:.1f}" for x in r[f"samples_per_s_{key}_runs"])
        print(f"  {label:<34} {r[f'samples_per_s_{key}']:>17.1f}   [{runs}]")
    print(f"  {'scaling efficiency (2p / 2x1p)':<34} {r['scaling_efficiency']:>17.3f}")
    print(f"  {'ML-100K epoch estimate, 2 proc':<34} {r['epoch_seconds_ml100k_estimate']:>15.1f} s   "
          f"({r['ml100k_train_samples']:,} samples; 1 proc: {r['epoch_seconds_ml100k_estimate_1proc']:.1f} s)")
    print(f"  {'GPU tokens/s (TinyLlama-1.1B)':<34} {fmt(r['gpu_tokens_per_s']):>17}")
    mfu = "n/a" if r["gpu_mfu"] is None else f"{100 * r['gpu_mfu']:.1f} %"
    print(f"  {'GPU MFU (LLM 6N flops, bf16 peak)':<34} {mfu:>17}")
    if r.get("gpu_error"):
        print(f"  GPU path failed: {r['gpu_error']}")
    print(f"  machine: {m['cores']} cores, GPU {m['gpu']}, load average start {m['loadavg']['start']} "
          f"end {m['loadavg']['end']}; total {r['total_seconds']:.0f} s")
    print(f"  -> {RESULTS_PATH.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
