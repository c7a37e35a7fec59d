"""Training: data loading, ranking, the loop, checkpoints, resume, failures, DDP."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hymirec_udfs.core.config import DmilConfig, ModelConfig, TrainConfig
from hymirec_udfs.recommender.dmil import sample_negatives
from hymirec_udfs.recommender.item_store import ItemStore
from hymirec_udfs.recommender.models import build_model, model_loss
from hymirec_udfs.training.optim import NonFiniteLossError, WarmupCosine
from hymirec_udfs.recommender.data import SequenceDataset, epoch_batches
from hymirec_udfs.core.shards import rank_shard_range, read_rank_share, user_shards
from hymirec_udfs.training.checkpoints import load_checkpoint
from hymirec_udfs.recommender.train import load_trained_model, rank_of_targets, train, train_local_processes

N_ITEMS, DIM = 40, 12

TINY = ModelConfig(
    interests=2, coarse_queries=2, light_width=16, light_heads=2, light_layers=1,
    llm_hidden=16, llm_heads=2, llm_kv_heads=1, llm_intermediate=32, dropout=0.1,
)
DMIL = DmilConfig(negatives=16, cluster_iters=3)
TRAIN = TrainConfig(epochs=2, batch_size=16, lr=3e-3, warmup_steps=3, checkpoint_every=4,
                    early_stopping_patience=5, torch_threads=1, seed=0)
WINDOW = dict(max_long=12, recent_window=4, window_targets=3)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# Toy data --------------------------------------------------------------------------------


def make_store(nan: bool = False, seed: int = 0) -> ItemStore:
    rng = np.random.default_rng(seed)
    groups = np.arange(N_ITEMS) % 4  # four topics
    centers = rng.normal(size=(4, DIM))
    emb = centers[groups] + 0.3 * rng.normal(size=(N_ITEMS, DIM))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.vstack([np.zeros((1, DIM)), emb]).astype(np.float32)
    if nan:
        emb[1:] = np.nan
    centroids = rng.normal(size=(2, 4, DIM)).astype(np.float32)
    codes = rng.integers(0, 4, size=(N_ITEMS + 1, 2))
    coefs = rng.uniform(0.2, 1.0, size=(N_ITEMS + 1, 2)).astype(np.float32)
    coefs[0] = 0
    return ItemStore([f"m{i}" for i in range(N_ITEMS)], emb, codes, coefs, centroids)


def make_rows(n_users: int = 24, seed: int = 0) -> list[dict]:
    """``sequences`` user rows (leave-one-out boundaries): each user mixes two topics."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        topics = rng.choice(4, 2, replace=False)
        pool = [i for i in range(N_ITEMS) if i % 4 in topics]
        hist = [f"m{i}" for i in rng.choice(pool, int(rng.integers(10, 16)))]
        rows.append(dict(user_id=f"u{u}", item_ids=hist, timestamps=list(range(len(hist))),
                         source_orders=list(range(len(hist))), train_end=len(hist) - 2, valid_end=len(hist) - 1))
    return rows


def write_parts(directory: Path, rows: list[dict], parts: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in range(parts):
        path = directory / f"part-{p:03d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[p::parts]), path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("toy")
    store = make_store()
    store_path = str(root / "store.npz")
    store.save(store_path)
    files = write_parts(root / "sequences", make_rows(), parts=2)
    return SimpleNamespace(root=root, store=store, store_path=store_path, files=files)


def run_train(toy: SimpleNamespace, ckpt: Path, train_cfg: TrainConfig = TRAIN, **kwargs) -> dict:
    args = dict(model_type="hymirec", model_cfg=TINY, dmil_cfg=DMIL, train_cfg=train_cfg,
                item_store_path=toy.store_path, train_files=toy.files, valid_files=toy.files,
                checkpoint_dir=str(ckpt), metrics_path=str(ckpt) + ".jsonl", **WINDOW)
    args.update(kwargs)
    return train(**args)


def read_metrics(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


# Data ------------------------------------------------------------------------------------


def _row(user: str, items: list[str], train_end: int, valid_end: int) -> dict:
    return dict(user_id=user, item_ids=items, timestamps=list(range(len(items))),
                source_orders=list(range(len(items))), train_end=train_end, valid_end=valid_end)


def test_dataset_cuts_truncates_and_pads(tmp_path) -> None:
    store = make_store()
    rows = [
        _row("a", [f"m{i}" for i in range(1, 10)], 9, 9),           # training only
        _row("b", ["m0", "m3", "m3", "m4"], 4, 4),
        _row("c", ["m1", "m2", "m3", "m2", "m3"], 4, 5),           # valid target m3, no test
    ]
    path = write_parts(tmp_path, rows, 1)
    ds = SequenceDataset(path, store, split="train", max_long=3, recent_window=2, window_targets=3,
                         max_samples_per_user=1)
    assert len(ds) == 3 and ds.cut.tolist() == [8, 3, 3]  # each user's most recent cut
    batch = ds.collate([0, 1])
    # Catalog index = position in item_ids + 1; long keeps the 3 items before the recent
    # window, left-padded; targets never pass the training part.
    assert batch.long_idx.tolist() == [[5, 6, 7], [0, 0, 1]]
    assert batch.recent_idx.tolist() == [[8, 9], [4, 4]]
    assert batch.target_idx.tolist() == [[10], [5]]
    assert batch.target_mask.tolist() == [[True], [True]]
    assert batch.user_ids == ["a", "b"]
    assert ds.long_lengths.tolist() == [3, 1, 1]
    valid = SequenceDataset(path, store, split="valid", max_long=3, recent_window=2, with_exclude=True)
    assert len(valid) == 1
    vb = valid.collate([0])
    assert vb.long_idx.tolist() == [[2, 3]] and vb.recent_idx.tolist() == [[4, 3]]
    assert vb.target_idx.tolist() == [[4]]
    # Distinct history, the target itself kept rankable.
    assert vb.exclude_idx.tolist() == [[2, 3]]
    assert len(SequenceDataset(path, store, split="test")) == 0


def test_dataset_samples_equal_the_sequences_cutting(tmp_path) -> None:
    # the loader and evaluation cut the same samples (sequences.samples.cut_samples)
    from hymirec_udfs.core.config import SequencesConfig
    from hymirec_udfs.sequences.samples import cut_samples

    store = make_store()
    rows = make_rows(n_users=5)
    path = write_parts(tmp_path, rows, 2)
    cfg = SequencesConfig(max_long=5, recent_window=3, window_targets=2, stride=2, max_samples_per_user=4)
    for split in ("train", "valid", "test"):
        ds = SequenceDataset(path, store, split=split, max_long=5, recent_window=3, window_targets=2, stride=2,
                             max_samples_per_user=4)
        expected = [x for r in sorted(rows, key=lambda r: r["user_id"]) for x in cut_samples(r, cfg, (split,))]
        assert len(ds) == len(expected)
        for i, sample in enumerate(expected):
            long, recent, targets = ds.sample(i)
            index = lambda ids: store.index_of(ids).tolist() if ids else []  # noqa: E731
            assert long.tolist() == index(sample["long_ids"])
            assert recent.tolist() == index(sample["recent_ids"])
            assert targets.tolist() == index(sample["target_ids"])
            assert ds.user_ids[i] == sample["user_id"] and ds.cut[i] == sample["cut"]


def test_k_sampled_cuts_per_user_per_epoch(tmp_path) -> None:
    """sequences.cuts_per_epoch=k: k cuts per user per epoch, drawn from all its cuts,
    the same for the same (seed, epoch, rank), different across epochs, and every cut is
    reached over epochs; the sample count (so steps per epoch) never changes."""
    store = make_store()
    rows = [_row("a", [f"m{i}" for i in range(1, 12)], 11, 11),   # 10 cuts
            _row("b", ["m0", "m3", "m4"], 3, 3),                 # 2 cuts: fewer than k
            _row("c", [f"m{i}" for i in range(2, 9)], 7, 7)]     # 6 cuts
    path = write_parts(tmp_path, rows, 1)
    every = SequenceDataset(path, store, split="train", max_long=3, recent_window=2)
    assert len(every) == 10 + 2 + 6
    ds = SequenceDataset(path, store, split="train", max_long=3, recent_window=2, cuts_per_epoch=3)
    seen: dict[str, set[int]] = {"a": set(), "b": set(), "c": set()}
    picks = []
    for epoch in range(30):
        ds.select_epoch(epoch, seed=5)
        assert len(ds) == 3 + 2 + 3
        per_user = {u: sorted(int(c) for c, o in zip(ds.cut, ds.user_ids) if o == u) for u in seen}
        assert [len(v) for v in per_user.values()] == [3, 2, 3] and per_user["b"] == [1, 2]
        for u, cuts in per_user.items():
            seen[u].update(cuts)
        picks.append(per_user)
        # a sample is still the cut it names (collate slices the same history)
        batch = ds.collate(np.arange(len(ds)))
        assert batch.user_ids == list(ds.user_ids)
    assert picks[0] != picks[1]
    assert seen == {u: {int(c) for c, o in zip(every.cut, every.user_ids) if o == u} for u in seen}
    again = SequenceDataset(path, store, split="train", max_long=3, recent_window=2, cuts_per_epoch=3)
    again.select_epoch(7, seed=5)
    assert again.cut.tolist() == [c for p in [picks[7]] for u in ("a", "b", "c") for c in p[u]]
    other_rank = SequenceDataset(path, store, split="train", max_long=3, recent_window=2, cuts_per_epoch=3, rank=0)
    other_rank.select_epoch(7, seed=6)
    assert other_rank.cut.tolist() != again.cut.tolist()  # another seed, other cuts


def test_training_with_k_cuts_per_epoch_is_deterministic_and_smaller(toy, tmp_path) -> None:
    first = run_train(toy, tmp_path / "k1", cuts_per_epoch=1)
    second = run_train(toy, tmp_path / "k2", cuts_per_epoch=1)
    assert first["train_samples"] == second["train_samples"]
    a = torch.load(first["last_checkpoint"], weights_only=False)["model_state"]
    b = torch.load(second["last_checkpoint"], weights_only=False)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic by seed
    full = run_train(toy, tmp_path / "all")
    assert first["train_samples"] < full["train_samples"]


@pytest.mark.parametrize("cap,stride", [(0, 1), (2, 2)])
def test_target_item_mask_is_the_union_of_the_samples_targets(tmp_path, cap: int, stride: int) -> None:
    store = make_store()
    path = write_parts(tmp_path, make_rows(n_users=6), 2)
    ds = SequenceDataset(path, store, split="train", max_long=5, recent_window=3, window_targets=3, stride=stride,
                         max_samples_per_user=cap)
    expected = np.zeros(N_ITEMS + 1, dtype=bool)
    for i in range(len(ds)):
        expected[ds.sample(i)[2]] = True
    assert 0 < expected.sum() < N_ITEMS and np.array_equal(ds.target_item_mask(N_ITEMS + 1), expected)
    assert not expected[0]  # never the padding row
    empty = SequenceDataset(write_parts(tmp_path / "one", [_row("a", ["m1"], 1, 1)], 1), store, split="train")
    assert len(empty) == 0 and not empty.target_item_mask(N_ITEMS + 1).any()


def test_ddp_training_keeps_untrained_items_id_rows_at_zero(toy, tmp_path) -> None:
    """model.item_id_trained_only over 2 ranks: the mask is every rank's targets (not
    rank 0's), and rows of items no one trains on stay zero (negatives only)."""
    rows = []
    for r in make_rows():  # items m34..m39 never appear: catalog items no one interacted with
        items = [i for i in r["item_ids"] if int(i[1:]) < N_ITEMS - 6]
        rows.append(_row(r["user_id"], items, len(items) - 2, len(items) - 1))
    files = write_parts(tmp_path / "seq", rows, 2)
    cfg = dataclasses.replace(TINY, item_adapter="mlp_id", item_id_trained_only=True)
    results = train_local_processes(
        2, model_type="hymirec", model_cfg=cfg, dmil_cfg=DMIL,
        train_cfg=dataclasses.replace(TRAIN, epochs=1, torch_threads=1),
        item_store_path=toy.store_path, train_files=files, valid_files=files,
        checkpoint_dir=str(tmp_path / "ddp"), metrics_path=str(tmp_path / "ddp.jsonl"), **WINDOW)
    state = load_checkpoint(results[0]["last_checkpoint"])["model_state"]
    union = SequenceDataset(files, toy.store, split="train", **WINDOW).target_item_mask(N_ITEMS + 1)
    rank0 = SequenceDataset(files, toy.store, split="train", rank=0, world_size=2, **WINDOW).target_item_mask(
        N_ITEMS + 1)
    assert not np.array_equal(union, rank0)  # each rank alone would miss items
    live = state["item_id_live"].numpy()
    assert np.array_equal(live, union) and not live[N_ITEMS - 5:].any()
    table = state["item_id.weight"]
    assert table[torch.from_numpy(~live)].abs().sum() == 0 and table[torch.from_numpy(live)].abs().sum() > 0


def test_dataset_unknown_item_names_user_and_id(tmp_path) -> None:
    path = write_parts(tmp_path, [_row("u1", ["m1", "m2", "ghost-7"], 3, 3)], 1)
    with pytest.raises(KeyError, match=r"item_ids.*u1.*ghost-7"):
        SequenceDataset(path, make_store(), split="train")


def test_dataset_split_selection(tmp_path) -> None:
    store = make_store()
    rows = make_rows(n_users=3)
    path = write_parts(tmp_path, rows, 1)
    n_train = sum(r["train_end"] - 1 for r in rows)  # every cut, stride 1
    assert len(SequenceDataset(path, store, split="train")) == n_train
    assert len(SequenceDataset(path, store, split="valid")) == 3
    assert len(SequenceDataset(path, store, split="test")) == 3
    assert len(SequenceDataset(path, store, split=None)) == n_train + 6
    with pytest.raises(ValueError, match="split must be one of"):
        SequenceDataset(path, store, split="holdout")


def test_rank_shares_depend_on_user_ids_only(tmp_path) -> None:
    import random

    rows = make_rows(n_users=12)
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    a = write_parts(tmp_path / "a", rows, 3)
    b = write_parts(tmp_path / "b", shuffled, 5)
    store = make_store()
    seen = []
    for rank in range(3):
        first = SequenceDataset(a, store, split=None, rank=rank, world_size=3)
        second = SequenceDataset(b[::-1], store, split=None, rank=rank, world_size=3)
        # same users, same rows in the same order, whatever the files and their row order
        assert first.user_ids.tolist() == second.user_ids.tolist()
        a_batch, b_batch = first.collate(np.arange(len(first))), second.collate(np.arange(len(second)))
        assert torch.equal(a_batch.long_idx, b_batch.long_idx) and torch.equal(a_batch.target_idx, b_batch.target_idx)
        lo, hi = rank_shard_range(rank, 3)
        assert all(lo <= s < hi for s in user_shards(first.user_ids.tolist()))
        assert first.user_ids.tolist() == sorted(first.user_ids.tolist())
        seen.extend(dict.fromkeys(first.user_ids.tolist()))
    assert sorted(seen) == sorted(r["user_id"] for r in rows)  # every user on exactly one rank


def test_rank_share_skips_row_groups_of_other_shards(tmp_path) -> None:
    rows = sorted(make_rows(n_users=40), key=lambda r: (user_shards([r["user_id"]])[0], r["user_id"]))
    for r in rows:
        r["shard"] = int(user_shards([r["user_id"]])[0])
    path = tmp_path / "sorted.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    lo, hi = rank_shard_range(0, 4)
    share = read_rank_share([str(path)], ["user_id"], rank=0, world_size=4, user_col="user_id",
                            sort_by=["user_id"])
    assert sorted(set(share.column("user_id").to_pylist())) == sorted(
        {r["user_id"] for r in rows if lo <= r["shard"] < hi})


def test_rank_share_names_a_missing_column(tmp_path) -> None:
    rows = [{k: v for k, v in r.items() if k != "train_end"} for r in make_rows(n_users=2)]
    path = write_parts(tmp_path, rows, 1)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['train_end'\]"):
        SequenceDataset(path, make_store(), split="train")


# Ranking ---------------------------------------------------------------------------------


def test_rank_of_targets_by_hand() -> None:
    users = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # score = max(x, y)
    items = torch.tensor([[9.0, 9.0],  # padding row: never ranked
                          [0.5, 0.0], [0.9, 0.1], [0.2, 0.95], [0.1, 0.3], [0.7, 0.7]])
    # target item 1 scores .5; items 2 (.9), 3 (.95), 5 (.7) beat it -> rank 4.
    target = torch.tensor([1])
    for chunk in (1, 2, 100):
        assert rank_of_targets(users, items, target, chunk_items=chunk).tolist() == [4]
        # Excluding history items 3 and 4 (4 scores below anyway) -> rank 3.
        assert rank_of_targets(users, items, target, torch.tensor([[0, 3, 4]]), chunk_items=chunk).tolist() == [3]
    # The best item ranks first even with itself in the catalog.
    assert rank_of_targets(users, items, torch.tensor([3])).tolist() == [1]


def test_rank_of_targets_counts_ties_against_the_target() -> None:
    # the evaluation's rule (pessimistic): an item scoring exactly the target's score
    # ranks above it, so validation picks checkpoints on the metric that is reported
    users = torch.tensor([[[1.0, 0.0]]])
    items = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.5, 0.3], [0.4, 0.0]])
    assert rank_of_targets(users, items, torch.tensor([1])).tolist() == [2]
    assert rank_of_targets(users, items, torch.tensor([2])).tolist() == [2]


def test_warmup_cosine_schedule() -> None:
    sched = WarmupCosine(warmup=2, total=6)
    assert [round(sched(s), 4) for s in range(7)] == [0.5, 1.0, 1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 4),
                                                      0.5, round(0.5 * (1 + math.cos(3 * math.pi / 4)), 4), 0.0]


def test_epoch_batches_bucket_lengths_and_cover_every_sample() -> None:
    lengths = np.random.default_rng(0).integers(0, 100, size=103)
    batches = epoch_batches(lengths, 10, np.random.default_rng(1), bucket_batches=5)
    assert len(batches) == 11
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    # Inside a 50-sample window, batches hold consecutive lengths: padding shrinks.
    plain = epoch_batches(lengths, 10, np.random.default_rng(1), bucket_batches=0)
    waste = lambda bs: sum(lengths[b].max() * len(b) - lengths[b].sum() for b in bs)  # noqa: E731
    assert waste(batches) < 0.5 * waste(plain)
    again = epoch_batches(lengths, 10, np.random.default_rng(1), bucket_batches=5)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))


# The loop --------------------------------------------------------------------------------


def test_few_steps_lower_the_loss(toy) -> None:
    ds = SequenceDataset(toy.files, toy.store, split="train", **WINDOW)
    batch = ds.collate(np.arange(32))
    torch.manual_seed(0)
    model = build_model("hymirec", dataclasses.replace(TINY, dropout=0.0), toy.store, max_long=12, max_recent=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    neg = sample_negatives(N_ITEMS, 16, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(25):
        loss, _ = model_loss(model, batch, DMIL, neg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_train_end_to_end_writes_checkpoints_metrics_and_loads(toy, tmp_path) -> None:
    result = run_train(toy, tmp_path / "ck")
    steps_per_epoch = math.ceil(sum(len(SequenceDataset([f], toy.store)) for f in toy.files) / TRAIN.batch_size)
    assert result["steps"] == 2 * steps_per_epoch
    assert result["epochs"] == 2 and result["stop_reason"] == "epochs"
    assert 0.0 < result["best_val_ndcg@10"] <= 1.0
    assert result["samples_per_s"] > 0
    assert os.path.exists(result["best_checkpoint"]) and os.path.exists(result["last_checkpoint"])
    metrics = read_metrics(str(tmp_path / "ck") + ".jsonl")
    train_lines = [m for m in metrics if m["kind"] == "train"]
    val_lines = [m for m in metrics if m["kind"] == "val"]
    assert [m["step"] for m in train_lines] == list(range(1, result["steps"] + 1))
    assert all(math.isfinite(m["loss"]) for m in train_lines)
    assert [m["epoch"] for m in val_lines] == [1, 2]
    assert max(m["val_ndcg@10"] for m in val_lines) == pytest.approx(result["best_val_ndcg@10"])
    ckpt = load_checkpoint(result["best_checkpoint"])
    assert ckpt["epoch"] == result["best_epoch"]
    model = load_trained_model(result["last_checkpoint"])
    ds = SequenceDataset(toy.files, toy.store, split="valid", with_exclude=True, **WINDOW)
    batch = ds.collate([0, 1, 2])
    out = model(batch.long_idx, batch.recent_idx)
    assert out.shape == (3, 2, DIM)
    # Running again on a finished directory trains nothing more.
    again = run_train(toy, tmp_path / "ck")
    assert again["steps"] == result["steps"] and again["resumed_from_step"] == result["steps"]


@pytest.mark.parametrize("model_type", ["sasrec", "hllm"])
def test_train_baselines(toy, tmp_path, model_type: str) -> None:
    result = run_train(toy, tmp_path / model_type, dataclasses.replace(TRAIN, epochs=1), model_type=model_type)
    assert result["epochs"] == 1 and result["best_val_ndcg@10"] is not None
    model = load_trained_model(result["last_checkpoint"])
    assert model.model_type == model_type


def test_resume_continues_exactly(toy, tmp_path) -> None:
    k1, k2 = 5, 17  # k1 mid-epoch 0, k2 in epoch 1 (13 steps per epoch): crosses validation
    straight = run_train(toy, tmp_path / "straight", dataclasses.replace(TRAIN, max_steps=k2))
    first = run_train(toy, tmp_path / "resumed", dataclasses.replace(TRAIN, max_steps=k1))
    assert first["steps"] == k1 and first["stop_reason"] == "max_steps"
    assert load_checkpoint(str(tmp_path / "resumed" / "last.pt"))["pos"] == k1
    second = run_train(toy, tmp_path / "resumed", dataclasses.replace(TRAIN, max_steps=k2))
    assert second["resumed_from_step"] == k1 and second["steps"] == k2 == straight["steps"]
    a = load_checkpoint(str(tmp_path / "straight" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "resumed" / "last.pt"))
    assert a["model_state"].keys() == b["model_state"].keys()
    for name in a["model_state"]:
        torch.testing.assert_close(a["model_state"][name], b["model_state"][name], atol=1e-5, rtol=1e-4)
    assert (a["epoch"], a["pos"]) == (b["epoch"], b["pos"])
    # The resumed run logged exactly the straight run's losses, without duplicates.
    la = [m for m in read_metrics(str(tmp_path / "straight") + ".jsonl") if m["kind"] == "train"]
    lb = [m for m in read_metrics(str(tmp_path / "resumed") + ".jsonl") if m["kind"] == "train"]
    assert [m["step"] for m in lb] == list(range(1, k2 + 1))
    np.testing.assert_allclose([m["loss"] for m in lb], [m["loss"] for m in la], rtol=1e-4)
    # Asking again for the same max_steps trains nothing more.
    third = run_train(toy, tmp_path / "resumed", dataclasses.replace(TRAIN, max_steps=k2))
    assert third["steps"] == k2 and third["stop_reason"] == "max_steps"


def test_resume_refuses_another_model(toy, tmp_path) -> None:
    run_train(toy, tmp_path / "ck", dataclasses.replace(TRAIN, max_steps=1))
    with pytest.raises(ValueError, match="fresh checkpoint_dir"):
        run_train(toy, tmp_path / "ck", dataclasses.replace(TRAIN, max_steps=2),
                  model_cfg=dataclasses.replace(TINY, interests=3))


def test_nan_loss_names_step_users_and_checkpoint(toy, tmp_path) -> None:
    # A fresh run on NaN embeddings fails at step 1 with no checkpoint yet.
    nan_path = str(tmp_path / "nan.npz")
    make_store(nan=True).save(nan_path)
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*users in the batch: \['u") as info:
        run_train(toy, tmp_path / "fresh", item_store_path=nan_path)
    assert info.value.step == 1 and info.value.checkpoint_path is None
    assert len(info.value.user_ids) == TRAIN.batch_size
    assert set(info.value.user_ids) <= {f"u{i}" for i in range(24)}
    # After 4 good steps the error names step 5 and the last good checkpoint.
    run_train(toy, tmp_path / "ck", dataclasses.replace(TRAIN, max_steps=4))
    with pytest.raises(NonFiniteLossError, match="step 5") as info:
        run_train(toy, tmp_path / "ck", item_store_path=nan_path)
    assert info.value.checkpoint_path == str(tmp_path / "ck" / "last.pt")
    assert load_checkpoint(info.value.checkpoint_path)["step"] == 4


def test_empty_training_data_is_a_clear_error(toy, tmp_path) -> None:
    with pytest.raises(ValueError, match="train_files is empty"):
        run_train(toy, tmp_path / "a", train_files=[])
    valid_only = [_row("u1", ["m1", "m2", "m3"], 1, 2), _row("u2", ["m4", "m5", "m6"], 1, 2)]  # no training cut
    files = write_parts(tmp_path / "v", valid_only, 1)
    with pytest.raises(ValueError, match="no training samples"):
        run_train(toy, tmp_path / "b", train_files=files)


def test_two_process_gloo_ddp(toy, tmp_path) -> None:
    results = train_local_processes(
        2, model_type="hymirec", model_cfg=TINY, dmil_cfg=DMIL,
        train_cfg=dataclasses.replace(TRAIN, epochs=1, torch_threads=1, checkpoint_every=3),
        item_store_path=toy.store_path, train_files=toy.files, valid_files=toy.files,
        checkpoint_dir=str(tmp_path / "ddp"), metrics_path=str(tmp_path / "ddp.jsonl"), **WINDOW,
    )
    assert len(results) == 2
    r0, r1 = results
    assert r0["world_size"] == 2 and r0["steps"] == r1["steps"] > 0
    # Validation is sharded and all-reduced: every rank reports the same number.
    assert r0["best_val_ndcg@10"] == pytest.approx(r1["best_val_ndcg@10"])
    ckpt = load_checkpoint(r0["last_checkpoint"])
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # The two ranks' dropout / negative streams differ.
    assert not torch.equal(ckpt["rng"][0]["negatives"], ckpt["rng"][1]["negatives"])
    lines = read_metrics(str(tmp_path / "ddp.jsonl"))
    assert [m["step"] for m in lines if m["kind"] == "train"] == list(range(1, r0["steps"] + 1))


@pytest.mark.spark
def test_torch_distributor_local_mode(spark, toy, tmp_path) -> None:
    from pyspark.ml.torch.distributor import TorchDistributor

    result = TorchDistributor(num_processes=2, local_mode=True, use_gpu=False).run(
        train, model_type="sasrec", model_cfg=TINY, dmil_cfg=DMIL,
        train_cfg=dataclasses.replace(TRAIN, epochs=1), item_store_path=toy.store_path,
        train_files=toy.files, valid_files=toy.files, checkpoint_dir=str(tmp_path / "td"),
        metrics_path=str(tmp_path / "td.jsonl"), **WINDOW,
    )
    assert result["world_size"] == 2 and result["epochs"] == 1
    assert result["best_val_ndcg@10"] is not None
    assert load_checkpoint(result["last_checkpoint"])["world_size"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_gpu_bf16(toy, tmp_path) -> None:
    result = run_train(toy, tmp_path / "gpu", dataclasses.replace(TRAIN, epochs=1, use_gpu=True))
    assert result["epochs"] == 1 and math.isfinite(result["best_val_ndcg@10"])
    model = load_trained_model(result["last_checkpoint"], map_location="cuda")
    assert next(model.parameters()).is_cuda


STREAM_CHECK = r"""
import sys, json, numpy as np, pyarrow as pa
from hymirec_udfs.recommender.item_store import ItemStore
from hymirec_udfs.recommender.data import SequenceDataset
from hymirec_udfs.core.shards import read_rank_share
n = 500
store = ItemStore([f"item-{i:08d}" for i in range(n)], np.zeros((n + 1, 4), np.float32), np.zeros((n + 1, 1)),
                  np.zeros((n + 1, 1), np.float32), np.zeros((1, 2, 4), np.float32))
files = [sys.argv[2]]
if sys.argv[1] == "dataset":
    ds = SequenceDataset(files, store, split="train", read_batch_rows=256)
    out = {"samples": len(ds), "history_bytes": int(ds.history.values.nbytes)}
else:
    table = read_rank_share(files, ["user_id", "item_ids"], rank=0, world_size=1, user_col="user_id",
                            sort_by=["user_id"])
    out = {"rows": table.num_rows}
out["peak"] = pa.default_memory_pool().max_memory()
print("STREAM " + json.dumps(out))
"""


def test_a_rank_streams_its_share_instead_of_holding_it_as_strings(tmp_path) -> None:
    """The loader reads its share a batch at a time: pyarrow's peak memory stays a small
    fraction of reading the share whole (4,000 users x 150 string ids), and what it keeps
    is one int32 per interaction."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    rows = [dict(user_id=f"user-{u:06d}", item_ids=[f"item-{i:08d}" for i in rng.integers(0, 500, 150)],
                 train_end=148, valid_end=149) for u in range(4000)]
    path = tmp_path / "seq.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=500)

    def run(mode: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", STREAM_CHECK, mode, str(path)], capture_output=True, text=True,
                              timeout=300)
        line = [x for x in proc.stdout.splitlines() if x.startswith("STREAM ")]
        assert proc.returncode == 0 and line, proc.stderr[-2000:]
        return json.loads(line[-1][len("STREAM "):])

    streamed, whole = run("dataset"), run("whole")
    assert whole["rows"] == 4000 and streamed["samples"] == 4000 * 147
    assert streamed["history_bytes"] == 4000 * 150 * 4  # int32 per interaction
    assert streamed["peak"] < whole["peak"] / 4, (streamed, whole)


def _cut_points_loop(train_end, valid_end, length, wanted, stride, max_samples_per_user, window_targets):
    """The per-sample loop the vectorised cut points replaced (the reference)."""
    owner, cut, end = [], [], []
    for u in range(len(train_end)):
        if "train" in wanted:
            cuts = range(1, int(train_end[u]), stride)
            if max_samples_per_user and len(cuts) > max_samples_per_user:
                cuts = cuts[-max_samples_per_user:]
            for c in cuts:
                owner.append(u), cut.append(c), end.append(min(c + window_targets, int(train_end[u])))
        if "valid" in wanted and valid_end[u] > train_end[u]:
            owner.append(u), cut.append(int(train_end[u])), end.append(int(train_end[u]) + 1)
        if "test" in wanted and length[u] > valid_end[u]:
            owner.append(u), cut.append(int(valid_end[u])), end.append(int(valid_end[u]) + 1)
    return [np.asarray(a, dtype=np.int64) for a in (owner, cut, end)]


@pytest.mark.parametrize("stride,cap,window", [(1, 0, 4), (1, 3, 4), (2, 0, 1), (3, 2, 2)])
@pytest.mark.parametrize("wanted", [("train", "valid", "test"), ("train",), ("valid",), ("test",)])
def test_vectorised_cut_points_equal_the_per_sample_loop(stride, cap, window, wanted) -> None:
    from hymirec_udfs.recommender.data import _cut_points

    rng = np.random.default_rng(stride * 10 + cap)
    length = rng.integers(0, 30, size=200)
    length[:4] = [0, 1, 2, 3]  # users too short for any cut
    valid_end = np.maximum(length - rng.integers(0, 2, size=200), 0)
    train_end = np.maximum(valid_end - rng.integers(0, 2, size=200), 0)
    got = _cut_points(train_end, valid_end, length, wanted, stride=stride, max_samples_per_user=cap,
                      window_targets=window)
    want = _cut_points_loop(train_end, valid_end, length, wanted, stride, cap, window)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert all(a.dtype == np.int64 for a in got)
