"""Stage 1 (train_content_encoder): learning, freezing, checkpoints, resume, NaN, windows,
and the embed stage picking up the fine-tuned encoder (re-embedding the catalog)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hymirec_udfs import artifacts
from hymirec_udfs.content_encoder import model as ce_model
from hymirec_udfs.content_encoder import windows as ce_windows
from hymirec_udfs.content_encoder import train as ce_train
from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import EmbedConfig, SequencesConfig, Stage1Config, TrainConfig
from hymirec_udfs.embedding.encoder import ContentEncoder, compute_model_id
from hymirec_udfs.training.optim import NonFiniteLossError

NOW = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
GENRES = ("comedy", "horror", "western", "romance")
N_ITEMS = 24
WINDOW = 6
TRAIN = TrainConfig(seed=0, warmup_steps=2, checkpoint_every=3, torch_threads=1, grad_clip=1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A random 2-layer BERT (width 32) with the MiniLM tokenizer."""
    import transformers

    target = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def _item_ids() -> list[str]:
    return [f"i{k:02d}" for k in range(N_ITEMS)]


def _texts() -> list[str]:
    return [f"{GENRES[k % len(GENRES)]} film number {k}" for k in range(N_ITEMS)]


def _toy_files(root: Path) -> tuple[list[str], list[str]]:
    """A catalog of four genres and windows that stay inside one genre (learnable)."""
    root.mkdir(parents=True, exist_ok=True)
    ids = _item_ids()
    pq.write_table(pa.table({"item_id": ids[::-1], "text": _texts()[::-1]}), root / "catalog.parquet")
    per_genre = N_ITEMS // len(GENRES)
    windows = [[ids[g + len(GENRES) * ((s + j) % per_genre)] for j in range(WINDOW)]
               for g in range(len(GENRES)) for s in range(per_genre)]
    pq.write_table(pa.table({"user_id": [f"u{k}" for k in range(len(windows))], "window": [0] * len(windows),
                             "item_ids": windows}), root / "windows.parquet")
    return [str(root / "catalog.parquet")], [str(root / "windows.parquet")]


def _train(model: str, root: Path, *, max_steps: int, ckpt: str = "ckpt", train_cfg: TrainConfig = TRAIN,
           **stage1: object) -> dict:
    catalog, windows = _toy_files(root / "data")
    s1 = Stage1Config(**{"enabled": True, "trainable": "all", "batch_size": 8, "seq_len": WINDOW, "lr": 1e-2,
                         "negatives": 16, "epochs": 50, "max_steps": max_steps, **stage1})
    return ce_train.train_content_encoder(
        embed_cfg=EmbedConfig(model=model, pooling="mean", max_tokens=16), stage1_cfg=s1, train_cfg=train_cfg,
        temperature=0.1, catalog_files=catalog, window_files=windows, checkpoint_dir=str(root / ckpt),
        output_dir=str(root / ckpt / "encoder"), metrics_path=str(root / ckpt / "metrics.jsonl"),
    )


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


# Learning, resume, NaN ------------------------------------------------------------------


def test_a_few_steps_lower_the_loss_and_save_a_checkpoint(tiny_bert_dir: str, tmp_path: Path) -> None:
    result = _train(tiny_bert_dir, tmp_path, max_steps=30)
    losses = _losses(tmp_path / "ckpt" / "metrics.jsonl")
    assert result["steps"] == 30 and len(losses) == 30 and result["stop_reason"] == "max_steps"
    # Chance level is log(1 + 16 negatives) ~ 2.83; genre-coherent windows are learnable.
    assert np.mean(losses[:5]) > 2.5
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    encoder = Path(result["encoder_path"])
    assert (encoder / "config.json").is_file() and (encoder / "tokenizer.json").is_file()
    assert compute_model_id(str(encoder), "mean", 16, None) != compute_model_id(tiny_bert_dir, "mean", 16, None)


def test_resume_continues_exactly_where_it_stopped(tiny_bert_dir: str, tmp_path: Path) -> None:
    straight = _train(tiny_bert_dir, tmp_path, max_steps=6, ckpt="straight")
    first = _train(tiny_bert_dir, tmp_path, max_steps=3, ckpt="resumed")
    assert first["steps"] == 3
    resumed = _train(tiny_bert_dir, tmp_path, max_steps=6, ckpt="resumed")
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == straight["steps"] == 6
    np.testing.assert_allclose(_losses(tmp_path / "resumed" / "metrics.jsonl"),
                               _losses(tmp_path / "straight" / "metrics.jsonl"), rtol=1e-5)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["trainable_state"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["trainable_state"]
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_naming_step_and_last_checkpoint(tiny_bert_dir: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = ce_model.dmil_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, info = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 5 else loss), info

    monkeypatch.setattr(ce_model, "dmil_loss", poisoned)
    message = r"non-finite loss at step 5 .*last good checkpoint: .*last\.pt"
    with pytest.raises(NonFiniteLossError, match=message) as err:
        _train(tiny_bert_dir, tmp_path, max_steps=10)
    assert err.value.step == 5 and err.value.checkpoint_path.endswith("last.pt")
    saved = torch.load(err.value.checkpoint_path, weights_only=True)
    assert saved["step"] == 3  # checkpoint_every=3: the last good state, not the bad step


def test_empty_catalog_and_bad_settings_fail_clearly(tiny_bert_dir: str, tmp_path: Path) -> None:
    pq.write_table(pa.table({"item_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(ce_model.ContentEncoderTrainingError, match="catalog is empty"):
        ce_train.train_content_encoder(
            embed_cfg=EmbedConfig(model=tiny_bert_dir), stage1_cfg=Stage1Config(), train_cfg=TRAIN,
            temperature=0.1, catalog_files=[str(tmp_path / "empty.parquet")], window_files=[],
            checkpoint_dir=str(tmp_path / "c"), output_dir=str(tmp_path / "c" / "encoder"),
        )
    with pytest.raises(ValueError, match="stage1.trainable must be one of"):
        ce_model.ContentEncoderTrainer(tiny_bert_dir, trainable="some")


# Freezing and the saved encoder ---------------------------------------------------------


def _step(trainer: ce_model.ContentEncoderTrainer, steps: int = 2) -> None:
    ids = np.arange(1, N_ITEMS + 1)
    windows = np.stack([ids[k:k + 4] for k in range(0, 16, 4)])
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        batch = trainer.make_batch(windows, ids[-8:], _texts())
        loss, n_targets = trainer(batch, temperature=0.1)
        assert n_targets == 12 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_last_layers_freezes_everything_but_the_last_block(tiny_llama_dir: str, tiny_bert_dir: str) -> None:
    torch.manual_seed(0)
    trainer = ce_model.ContentEncoderTrainer(tiny_llama_dir, pooling="last_token", max_tokens=16, seq_len=4,
                                        trainable="last_layers", last_layers=1)
    trained = {name for name, p in trainer.llm.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("layers.1.", "norm.")) for name in trained)
    assert any(name.startswith("norm.") for name in trained)  # Llama's final norm follows the last block
    before = {name: p.detach().clone() for name, p in trainer.named_parameters()}
    _step(trainer)
    for name, p in trainer.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if name.startswith("llm.") and name[len("llm."):] not in trained:
            assert not changed, f"frozen {name} changed"
    assert not torch.equal(before["llm.layers.1.mlp.up_proj.weight"], trainer.llm.layers[1].mlp.up_proj.weight)
    assert not torch.equal(before["item_token_embedding"], trainer.item_token_embedding)  # learnable item token
    assert trainer.trainable_params < trainer.total_params

    bert = ce_model.ContentEncoderTrainer(tiny_bert_dir, seq_len=4, trainable="last_layers", last_layers=1)
    trained = {name for name, p in bert.llm.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith("encoder.layer.1.") for name in trained)  # no embeddings, no pooler
    frozen = ce_model.ContentEncoderTrainer(tiny_bert_dir, seq_len=4, trainable="none")
    assert frozen.trainable_params == 0 and all(p.requires_grad for p in frozen.user_model.parameters())

    checkpointed = ce_model.ContentEncoderTrainer(tiny_llama_dir, pooling="last_token", max_tokens=16, seq_len=4,
                                             trainable="last_layers", gradient_checkpointing=True)
    assert checkpointed.gradient_checkpointing
    block = checkpointed.llm.layers[1].mlp.up_proj.weight.detach().clone()
    _step(checkpointed)  # gradients still reach the trained block through the recomputation
    assert not torch.equal(block, checkpointed.llm.layers[1].mlp.up_proj.weight)


def test_saved_encoder_loads_and_embeds_like_the_trained_model(tiny_llama_dir: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer = ce_model.ContentEncoderTrainer(tiny_llama_dir, pooling="last_token", max_tokens=16, item_token="[ITEM]",
                                        seq_len=4, trainable="all")
    _step(trainer)
    in_memory = trainer.embed_texts(_texts())
    path = trainer.save_encoder(tmp_path / "encoder")
    loaded = ContentEncoder(path, pooling="last_token", max_tokens=16, item_token="[ITEM]", device="cpu",
                            num_threads=1)
    assert "[ITEM]" in loaded.tokenizer.get_vocab() and loaded.item_token_id == trainer.item_token_id
    np.testing.assert_allclose(loaded.predict(_texts()), in_memory, atol=1e-5)
    base = ContentEncoder(tiny_llama_dir, pooling="last_token", max_tokens=16, item_token="[ITEM]", device="cpu",
                          num_threads=1)
    assert not np.allclose(base.predict(_texts()), in_memory, atol=1e-3)
    assert loaded.model_id != base.model_id


# Spark: windows, the stage, and the embed stage re-embedding --------------------------------


def _write_tables(spark, store, users: dict[str, list[str]], texts: dict[str, str]) -> None:
    items = [(i, i, None, None, t, "test", NOW, None, None) for i, t in texts.items()]
    store.overwrite(schemas.ITEMS, spark.createDataFrame(items, schemas.spark_schema(schemas.ITEMS)))
    rows = [(u, item, int(t), None, "test", n * 1000 + int(t))
            for n, (u, seq) in enumerate(users.items()) for t, item in enumerate(seq)]
    store.overwrite(schemas.INTERACTIONS, spark.createDataFrame(rows, schemas.spark_schema(schemas.INTERACTIONS)))


@pytest.mark.spark
def test_windows_hold_out_the_last_two_items_and_skip_items_without_text(spark) -> None:
    inter = spark.createDataFrame(
        [("u", item, ts, ts) for ts, item in enumerate("abcdefghijk")] + [("u", "x", 3, 99)]  # x: tie at t=3, no text
        + [("v", "a", 1, 1), ("v", "b", 2, 2), ("v", "c", 3, 3)],  # v keeps one item: no window
        "user_id string, item_id string, timestamp long, source_order long",
    )
    items = spark.createDataFrame([(i, f"text {i}") for i in "abcdefghijk"] + [("x", " ")],
                                  "item_id string, text string")
    got = {(r.user_id, r.window): r.item_ids
           for r in ce_windows.build_windows(inter, items, seq_len=4).collect()}
    # u: a..k minus the held-out j, k -> a..i, cut from the end into 4s; the lone 'a' is dropped.
    assert got == {("u", 0): list("fghi"), ("u", 1): list("bcde")}
    cutoff = SequencesConfig(split="time_cutoff", valid_cutoff=6, test_cutoff=9)
    got = {(r.user_id, r.window): r.item_ids
           for r in ce_windows.build_windows(inter, items, seq_len=4, sequences_cfg=cutoff).collect()}
    assert got == {("u", 0): list("cdef"), ("u", 1): list("ab"), ("v", 0): list("abc")}


@pytest.mark.spark
def test_stage1_then_embed_reembeds_every_item_with_the_new_model(spark, make_cfg, tiny_bert_dir: str) -> None:
    from hymirec_udfs.artifacts import current_model_id
    from hymirec_udfs.core.stage_api import StageFailed
    from hymirec_udfs.pipeline import run_pipeline, run_stage
    from hymirec_udfs.core.tables import get_table_store

    common = (f"embed.model={tiny_bert_dir}", "embed.max_tokens=16", "train.num_processes=1",
              "train.torch_threads=1", "stage1.max_steps=2", "stage1.batch_size=4", "stage1.seq_len=4",
              "stage1.negatives=8")
    off = make_cfg(*common)
    on = make_cfg(*common, "stage1.enabled=true")
    store = get_table_store(spark, off)
    texts = {f"m{k}": f"{GENRES[k % 4]} film {k}" for k in range(12)}
    users = {f"u{u}": [f"m{(u + 3 * j) % 12}" for j in range(8)] for u in range(4)}
    _write_tables(spark, store, users, texts)

    lines: list[str] = []
    skipped = run_pipeline(spark, off, stages=["train-content-encoder"], echo=lines.append)
    assert skipped[0].skipped and skipped[0].summary["reason"] == "stage1.enabled is false"
    assert "skipped: stage1.enabled is false" in lines[-1]
    with pytest.raises(StageFailed, match="no successful 'train_content_encoder' run"):
        run_stage(spark, on, "embed")

    before = run_stage(spark, off, "embed")
    assert before.row_counts["embedded"] == 12
    stage1 = run_stage(spark, on, "train-content-encoder")
    assert stage1.row_counts["steps"] == 2 and stage1.row_counts["windows"] == 8  # 6 items left per user: 4 + 2
    encoder_path = stage1.summary["encoder_path"]
    assert Path(encoder_path, "config.json").is_file() and encoder_path.endswith("/encoder")
    assert stage1.summary["model_id"] != before.summary["model_id"]
    assert artifacts.resolve_encoder_model(store, on) == encoder_path
    assert current_model_id(on.embed, store, on.stage1) == stage1.summary["model_id"]

    after = run_stage(spark, on, "embed")
    assert after.row_counts["embedded"] == 12 and after.summary["model_id"] == stage1.summary["model_id"]
    rows = store.read(schemas.ITEM_EMBEDDINGS).collect()
    assert len(rows) == 12 and {r.model_id for r in rows} == {stage1.summary["model_id"]}

    # A stage-1 result for other embed settings is refused, not silently used.
    other = make_cfg(*common, "stage1.enabled=true", "embed.max_tokens=32")
    with pytest.raises(ce_model.ContentEncoderTrainingError, match="run train-content-encoder again"):
        artifacts.resolve_encoder_model(store, other)


@pytest.mark.spark
def test_stage_refuses_empty_interactions(spark, make_cfg, tiny_bert_dir: str) -> None:
    from hymirec_udfs.core.stage_api import StageFailed
    from hymirec_udfs.pipeline import run_stage
    from hymirec_udfs.core.tables import get_table_store

    cfg = make_cfg(f"embed.model={tiny_bert_dir}", "stage1.enabled=true")
    store = get_table_store(spark, cfg)
    _write_tables(spark, store, {}, {"m1": "a film"})
    with pytest.raises(StageFailed, match="'interactions' is empty"):
        run_stage(spark, cfg, "train-content-encoder")
    _write_tables(spark, store, {"u": ["m1", "m1", "m1"]}, {"m1": "a film"})  # one item left: no window
    with pytest.raises(StageFailed, match="no stage-1 windows"):
        run_stage(spark, cfg, "train-content-encoder")
