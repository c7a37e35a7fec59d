"""Stage-2 models: item store, shapes, padding invariance, ablation switches, bad widths."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hymirec_udfs.core.config import DmilConfig, ModelConfig
from hymirec_udfs.recommender.dmil import sample_negatives
from hymirec_udfs.recommender.models import (
    TINYLLAMA_1_1B_SIZES, HLLMSingle, HyMiRec, LightEncoder, SASRec, build_model, model_loss, recency_positions,
    score_against,
)
from hymirec_udfs.recommender.item_store import ItemStore

N_ITEMS, DIM, LAYERS, K = 40, 12, 2, 4

TINY = ModelConfig(
    interests=2, coarse_queries=2, light_width=16, light_heads=2, light_layers=1,
    llm_hidden=16, llm_heads=2, llm_kv_heads=1, llm_intermediate=32, dropout=0.0,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Tiny matmuls on a shared 2-core machine are far faster single-threaded.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def make_store(seed: int = 0, metric: str = "cosine", codes: np.ndarray | None = None) -> ItemStore:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(N_ITEMS + 1, DIM)).astype(np.float32)
    emb[1:] /= np.linalg.norm(emb[1:], axis=1, keepdims=True)
    emb[0] = 0
    centroids = rng.normal(size=(LAYERS, K, DIM)).astype(np.float32)
    if codes is None:
        codes = rng.integers(0, K, size=(N_ITEMS + 1, LAYERS))
    coefs = rng.uniform(0.1, 1.0, size=(N_ITEMS + 1, LAYERS)).astype(np.float32)
    coefs[0] = 0
    return ItemStore([f"item{i}" for i in range(N_ITEMS)], emb, codes, coefs, centroids, metric)


def _build(model_type: str = "hymirec", cfg: ModelConfig = TINY, store: ItemStore | None = None,
           seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_type, cfg, store or make_store(), max_long=16, max_recent=8, **kwargs).eval()


LONG = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0]])
RECENT = torch.tensor([[0, 7, 8], [9, 10, 11], [0, 0, 12]])


# Item store ------------------------------------------------------------------------------


def test_item_store_index_of_save_load(tmp_path) -> None:
    store = make_store()
    assert store.index_of(["item0", "item39", "item5"]).tolist() == [1, 40, 6]
    with pytest.raises(KeyError, match="ghost"):
        store.index_of(["item1", "ghost", "ghost"])
    for dtype, atol in (("float32", 0.0), ("float16", 1e-3)):
        path = str(tmp_path / f"store-{dtype}")
        store.save(path, dtype=dtype, meta={"codebook_version": "v7"})
        again = ItemStore.load(path)
        assert again.item_ids == store.item_ids
        assert again.path == path and again.meta["codebook_version"] == "v7"
        np.testing.assert_array_equal(again.codes[1:], store.codes[1:])
        assert not again.codes[0].any() and not again.embeddings[0].any()  # row 0 is padding
        np.testing.assert_allclose(again.embeddings[1:].astype(np.float32), store.embeddings[1:], atol=atol)
        np.testing.assert_array_equal(again.coefs[1:], store.coefs[1:])
        assert again.codebook_metric == "cosine"
        # memory-mapped, in the dtype asked for: ranks share the file's pages
        assert isinstance(again.embeddings, np.memmap) and again.embeddings.dtype == np.dtype(dtype)


def test_item_store_model_views_the_mapped_file(tmp_path) -> None:
    """The model's catalog buffer is the memory map itself (no per-rank float32 copy), and
    a float16 store gives the float32 model the same interests up to fp16 rounding."""
    store = make_store()
    store.save(str(tmp_path / "s16"))
    mapped = ItemStore.load(str(tmp_path / "s16"))
    model = _build(store=mapped)
    assert model.item_embeddings.dtype == torch.float16
    assert model.item_embeddings.data_ptr() == mapped.embeddings.ctypes.data
    reference = _build(store=store)
    torch.testing.assert_close(model(LONG, RECENT), reference(LONG, RECENT), atol=5e-3, rtol=0)


def test_item_store_writer_refuses_short_or_unfinished_writes(tmp_path) -> None:
    from hymirec_udfs.recommender.item_store import ItemStoreWriter

    store = make_store()
    target = tmp_path / "store"
    store.save(str(target))
    with pytest.raises(ValueError, match="3 rows written, 40 declared"):
        with ItemStoreWriter(str(target), N_ITEMS, DIM, store.centroids, "cosine") as writer:
            writer.append(store.item_ids[:3], store.embeddings[1:4], store.codes[1:4], store.coefs[1:4])
    assert ItemStore.load(str(target)).n_items == N_ITEMS  # the previous store is untouched
    assert not (tmp_path / "store.partial").exists()
    with pytest.raises(ValueError, match="more rows than the 2 declared"):
        with ItemStoreWriter(str(tmp_path / "small"), 2, DIM, store.centroids, "cosine") as writer:
            writer.append(store.item_ids[:3], store.embeddings[1:4], store.codes[1:4], store.coefs[1:4])
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="no meta.json: an unfinished write"):
        ItemStore.load(str(tmp_path / "half"))


def test_item_store_rejects_inconsistent_arrays() -> None:
    store = make_store()
    with pytest.raises(ValueError, match="embeddings must be"):
        ItemStore(store.item_ids, store.embeddings[:-1], store.codes, store.coefs, store.centroids)
    with pytest.raises(ValueError, match="codes must lie"):
        bad = store.codes.copy()
        bad[3, 0] = K
        ItemStore(store.item_ids, store.embeddings, bad, store.coefs, store.centroids)
    with pytest.raises(ValueError, match="codebook_metric"):
        ItemStore(store.item_ids, store.embeddings, store.codes, store.coefs, store.centroids, "l1")


# Codebook decoding -----------------------------------------------------------------------


def _decode_store(metric: str) -> ItemStore:
    emb = np.zeros((2, 2), dtype=np.float32)
    emb[1] = [1.0, 0.0]
    centroids = np.array([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 4.0], [0.0, 0.0]]], dtype=np.float32)  # (L=2, K=2, D=2)
    codes = np.array([[0, 0], [1, 0]])  # item 1: layer-0 centroid 1, layer-1 centroid 0
    coefs = np.array([[0, 0], [2.0, 0.5]], dtype=np.float32)
    return ItemStore(["a"], emb, codes, coefs, centroids, metric)


def test_decode_items_cosine_and_euclidean_by_hand() -> None:
    cfg = dataclasses.replace(TINY, light_width=2, light_heads=1)
    cos_model = build_model("hymirec", cfg, _decode_store("cosine"), max_long=4, max_recent=2)
    # 2 * (0, 1) + 0.5 * (3, 4) = (1.5, 4) -> / sqrt(1.5^2 + 4^2)
    expected = torch.tensor([1.5, 4.0]) / math.sqrt(1.5**2 + 16)
    torch.testing.assert_close(cos_model.decode_items(torch.tensor([1, 0])),
                               torch.stack([expected, torch.zeros(2)]))
    euc_model = build_model("hymirec", cfg, _decode_store("euclidean"), max_long=4, max_recent=2)
    # (0, 1) + (3, 4) = (3, 5), coefficients ignored
    torch.testing.assert_close(euc_model.decode_items(torch.tensor([1])), (torch.tensor([3.0, 5.0]) / math.sqrt(34))[None])


# HyMiRec ---------------------------------------------------------------------------------


def test_hymirec_shape_unit_norm_and_buffers_not_trained() -> None:
    model = _build()
    out = model(LONG, RECENT)
    assert out.shape == (3, TINY.interests, DIM)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, TINY.interests))
    names = {n for n, _ in model.named_parameters()}
    assert not {"item_embeddings", "item_codes", "item_coefs", "centroids"} & names
    assert "item_embeddings" not in model.state_dict()  # checkpoints name the store instead
    assert {"coarse_queries", "indicator", "refined_queries"} <= names


@pytest.mark.parametrize("width", [16, 64, 256])
def test_at_init_item_content_is_most_of_a_history_token(width: int) -> None:
    # With nn.Embedding's N(0, 1) positions the content was ~4% of a history token at
    # width 64; positions now start at half the projected content's norm.
    cfg = dataclasses.replace(TINY, light_width=width, light_heads=2)
    model = _build(cfg=cfg)
    with torch.no_grad():
        idx = LONG[1:2]
        content = model.light_in(model.long_history_vectors(idx))
        token = content + model.light_pos(recency_positions(idx))
        share = (content.norm(dim=-1) / token.norm(dim=-1)).mean().item()
        recent = model.recent_in(model.item_embeddings[1:]).norm(dim=-1).mean().item()
    assert share >= 0.3
    assert share < 0.999  # positions are not zero: order is visible
    # the indicator is as large as the content tokens it marks the coarse tokens against
    assert 0.5 * recent < model.indicator.norm().item() < 2.0 * recent


@pytest.mark.parametrize("model_type", ["hymirec", "hllm", "sasrec"])
def test_extra_left_padding_does_not_change_output(model_type: str) -> None:
    model = _build(model_type)
    out = model(LONG, RECENT)
    pad_long = torch.cat([torch.zeros(3, 5, dtype=torch.long), LONG], dim=1)
    pad_recent = torch.cat([torch.zeros(3, 4, dtype=torch.long), RECENT], dim=1)
    torch.testing.assert_close(model(pad_long, pad_recent), out, atol=2e-5, rtol=1e-4)


def test_light_encoder_query_only_last_block_is_exact() -> None:
    torch.manual_seed(0)
    enc = LightEncoder(width=8, heads=2, layers=2, dropout=0.0).eval()
    tokens = torch.randn(2, 7, 8)
    keep = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    # Reference: every block computes all rows, the query rows are read at the end.
    x = tokens
    for block in enc.blocks:
        x = block(x, keep, x.shape[1])
    torch.testing.assert_close(enc(tokens, keep, n_queries=2), enc.norm(x)[:, :2], atol=1e-6, rtol=1e-5)
    # Padding keys are ignored: changing a padded token changes nothing.
    other = tokens.clone()
    other[0, 2] += 5.0
    torch.testing.assert_close(enc(other, keep, 2), enc(tokens, keep, 2))


def test_pretrained_llm_checkpoint_is_used(tiny_llama_dir: str) -> None:
    cfg = dataclasses.replace(TINY, llm_checkpoint=tiny_llama_dir)
    model = _build(cfg=cfg)
    assert model.llm_hidden == 64  # the checkpoint's width, not cfg.llm_hidden
    assert not model.llm.get_input_embeddings().weight.requires_grad
    out = model(LONG, RECENT)
    assert out.shape == (3, 2, DIM)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 2))


def test_no_light_has_no_coarse_tokens_and_ignores_long_history() -> None:
    light = _build()
    other_long = LONG.clone()
    other_long[1, 0] = 20
    assert not torch.allclose(light(LONG, RECENT), light(other_long, RECENT))

    no_light = _build(cfg=dataclasses.replace(TINY, use_light=False))
    names = {n for n, _ in no_light.named_parameters()}
    assert not any(n.startswith(("light", "coarse")) or n == "indicator" for n in names)
    torch.testing.assert_close(no_light(LONG, RECENT), no_light(other_long, RECENT))
    # Its LLM sequence is recent window + queries only.
    assert no_light.llm.config.max_position_embeddings >= 8 + TINY.interests


def test_no_indicator_has_no_indicator_parameter() -> None:
    model = _build(cfg=dataclasses.replace(TINY, use_indicator=False))
    assert not hasattr(model, "indicator")
    assert "indicator" not in dict(model.named_parameters())
    with_ind = _build()
    assert with_ind.indicator.shape == (TINY.llm_hidden,)


def test_codebook_switch_decides_whether_codes_matter() -> None:
    store = make_store(seed=0)
    perturbed_codes = (store.codes + 1) % K
    perturbed = make_store(seed=0, codes=perturbed_codes)
    assert not np.array_equal(perturbed.codes, store.codes)
    np.testing.assert_array_equal(perturbed.embeddings, store.embeddings)

    with_cb = [_build(store=s, seed=1)(LONG, RECENT) for s in (store, perturbed)]
    assert not torch.allclose(with_cb[0], with_cb[1])

    no_cb_cfg = dataclasses.replace(TINY, use_codebook=False)
    without_cb = [_build(cfg=no_cb_cfg, store=s, seed=1)(LONG, RECENT) for s in (store, perturbed)]
    torch.testing.assert_close(without_cb[0], without_cb[1])
    # Without the codebook the long history is read as the full embeddings.
    model = _build(cfg=no_cb_cfg, store=store)
    torch.testing.assert_close(model.long_history_vectors(torch.tensor([3])), torch.from_numpy(store.embeddings[3:4]))


def test_without_dmil_one_interest_and_next_item_only() -> None:
    store = make_store()
    dmil_off = DmilConfig(enabled=False, negatives=8)
    model = _build(store=store, dmil_cfg=dmil_off)
    assert model(LONG, RECENT).shape == (3, 1, DIM)
    targets = torch.tensor([[13, 14, 15], [16, 17, 0], [18, 0, 0]])
    other = targets.clone()
    other[:, 1:] = torch.tensor([[30, 31], [32, 0], [0, 0]])
    neg = sample_negatives(N_ITEMS, 8, torch.Generator().manual_seed(0))

    def loss(m: torch.nn.Module, t: torch.Tensor, cfg: DmilConfig) -> float:
        batch = SimpleNamespace(long_idx=LONG, recent_idx=RECENT, target_idx=t, target_mask=t != 0)
        return model_loss(m, batch, cfg, neg)[0].item()

    assert loss(model, targets, dmil_off) == pytest.approx(loss(model, other, dmil_off))
    # "Without window targets": still s interests, but only t_1 counts.
    full = _build(store=store)
    no_window = DmilConfig(window_targets=False, negatives=8)
    assert full(LONG, RECENT).shape[1] == 2
    assert loss(full, targets, no_window) == pytest.approx(loss(full, other, no_window))
    assert loss(full, targets, DmilConfig(negatives=8)) != pytest.approx(loss(full, other, DmilConfig(negatives=8)))


@pytest.mark.parametrize("kind", ["mlp", "mlp_id"])
@pytest.mark.parametrize("model_type", ["hymirec", "hllm"])
def test_item_adapter_starts_as_identity_trains_and_ranks(kind: str, model_type: str) -> None:
    """The item tower: equal to the content at init, trained by the loss, used for ranking."""
    store = make_store()
    cfg = dataclasses.replace(TINY, item_adapter=kind)
    model = _build(model_type, cfg, store=store)
    plain = _build(model_type, TINY, store=store)
    torch.testing.assert_close(model.item_vectors(), plain.item_vectors())
    assert torch.all(model.item_vectors()[0] == 0)
    dmil = DmilConfig(negatives=8)
    neg = sample_negatives(N_ITEMS, 8, torch.Generator().manual_seed(0))
    targets = torch.tensor([[13, 14, 15], [16, 17, 0], [18, 0, 0]])
    batch = SimpleNamespace(long_idx=LONG, recent_idx=RECENT, target_idx=targets, target_mask=targets != 0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss0 = model_loss(model, batch, dmil, neg)[0]
    loss0.backward()
    assert model.adapter[2].weight.grad.abs().sum() > 0
    if kind == "mlp_id":
        grad = model.item_id.weight.grad
        assert grad[13].abs().sum() > 0 and grad[0].abs().sum() == 0  # padding row never trained
    opt.step()
    model.eval()
    moved = (model.item_vectors()[1:] - plain.item_vectors()[1:]).norm(dim=-1)
    assert moved.max() > 1e-3  # ranking now uses the trained tower
    torch.testing.assert_close(model.item_vectors()[1:].norm(dim=-1), torch.ones(N_ITEMS))
    # the item vectors of the loss are those of ranking
    idx = torch.tensor([3, 0, 7])
    torch.testing.assert_close(model.item_vectors_of(idx), model.item_vectors()[idx])


def test_item_id_trained_only_leaves_untrained_items_to_content() -> None:
    """Items that are never a training target keep no ID residual: no gradient from being a
    sampled negative, and they are ranked by content through the MLP like a new item."""
    store = make_store()
    cfg = dataclasses.replace(TINY, item_adapter="mlp_id", item_id_trained_only=True)
    model = _build(cfg=cfg, store=store)
    targets = torch.tensor([[13, 14, 15], [16, 17, 0], [18, 0, 0]])
    live = torch.zeros(N_ITEMS + 1, dtype=torch.bool)
    live[targets[targets != 0]] = True
    model.set_item_id_live(live)
    neg = torch.tensor([1, 2, 3, 13, 19, 20, 21, 22])  # 13 is live, the rest are negatives only
    batch = SimpleNamespace(long_idx=LONG, recent_idx=RECENT, target_idx=targets, target_mask=targets != 0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model_loss(model, batch, DmilConfig(negatives=8), neg)[0].backward()
    grad = model.item_id.weight.grad
    assert grad[13].abs().sum() > 0 and grad[18].abs().sum() > 0
    assert grad[~live].abs().sum() == 0  # a negative-only row learns nothing
    opt.step()
    model.eval()
    assert model.item_id.weight[~live].abs().sum() == 0 and model.item_id.weight[13].abs().sum() > 0
    content = store.embeddings[1:].astype(np.float32)
    as_known = model.ranking_vectors(torch.from_numpy(content), torch.arange(1, N_ITEMS + 1))
    as_new = model.ranking_vectors(torch.from_numpy(content), torch.zeros(N_ITEMS, dtype=torch.long))
    dead = ~live[1:]
    torch.testing.assert_close(as_known[dead], as_new[dead])  # untrained = scored like a new item
    assert not torch.allclose(as_known[13 - 1], as_new[13 - 1])
    torch.testing.assert_close(model.item_vectors()[1:], as_known)
    # the mask is saved with the model; a model saved before it existed uses every row
    again = _build(cfg=cfg, store=store)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.item_id_live, live)
    old = {k: v for k, v in model.state_dict().items() if k != "item_id_live"}
    again.load_state_dict(old)
    assert bool(again.item_id_live.all())
    with pytest.raises(ValueError, match="shape"):
        model.set_item_id_live(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mlp_id"):
        _build(cfg=dataclasses.replace(TINY, item_adapter="mlp")).set_item_id_live(live)
    with pytest.raises(ValueError, match="model.item_id_trained_only needs model.item_adapter=mlp_id"):
        _build(cfg=dataclasses.replace(TINY, item_adapter="mlp", item_id_trained_only=True))


def test_item_adapter_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="model.item_adapter must be one of"):
        _build(cfg=dataclasses.replace(TINY, item_adapter="tower"))


def test_learnable_temperature_adds_logit_scale() -> None:
    model = _build(dmil_cfg=DmilConfig(learnable_temperature=True, temperature=0.05))
    assert model.logit_scale.item() == pytest.approx(math.log(20.0))
    assert _build().logit_scale is None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(light_width=18, light_heads=4), "light_width"),
        (dict(llm_hidden=18, llm_heads=4), "llm_hidden"),
        (dict(llm_heads=4, llm_kv_heads=3), "llm_kv_heads"),
        (dict(llm_hidden=12, llm_heads=4), "even"),
        (dict(interests=0), "interests"),
        (dict(coarse_queries=0), "coarse_queries"),
    ],
)
def test_bad_widths_raise(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model("hymirec", dataclasses.replace(TINY, **change), make_store())


def test_tinyllama_sizes_are_a_valid_config() -> None:
    cfg = dataclasses.replace(TINY, **TINYLLAMA_1_1B_SIZES)
    assert (cfg.llm_hidden, cfg.llm_layers, cfg.llm_heads, cfg.llm_kv_heads, cfg.llm_intermediate) == (
        2048, 22, 32, 4, 5632)
    from hymirec_udfs.recommender.models import _check_widths

    _check_widths(cfg)  # no ValueError


# Baselines -------------------------------------------------------------------------------


def test_hllm_is_hymirec_without_light_and_one_interest() -> None:
    model = _build("hllm")
    assert isinstance(model, HLLMSingle) and isinstance(model, HyMiRec)
    assert model.cfg.interests == 1 and not model.cfg.use_light
    assert model(LONG, RECENT).shape == (3, 1, DIM)


def test_sasrec_shape_scores_and_loss_alignment() -> None:
    model = _build("sasrec")
    assert isinstance(model, SASRec) and model.similarity == "dot"
    out = model(LONG, RECENT)
    assert out.shape == (3, 1, TINY.light_width)
    scores = model.score_items(out)
    assert scores.shape == (3, N_ITEMS + 1)
    torch.testing.assert_close(scores, out[:, 0] @ model.item_emb.weight.T)
    # Next-item targets: row 0 = [pad, 7, 8] -> predicts 8 after 7 and next after 8.
    recent = torch.tensor([[0, 7, 8]])
    nxt = torch.tensor([21])
    hidden = model.encode(recent)
    logits = hidden[0, [1, 2]] @ model.item_emb.weight.T
    logits[:, 0] = -float("inf")
    expected = F.cross_entropy(logits, torch.tensor([8, 21]))
    torch.testing.assert_close(model(None, recent, nxt), expected)
    batch = SimpleNamespace(long_idx=None, recent_idx=recent, target_idx=torch.tensor([[21, 5]]),
                            target_mask=torch.tensor([[True, True]]))
    torch.testing.assert_close(model_loss(model, batch, DmilConfig())[0], expected)


def test_sasrec_max_len_reads_the_long_tail_then_the_window() -> None:
    """model.sasrec_max_len=50 (SASRec's usual length) reads the last 50 of long + recent;
    0 keeps the recent window only (the demo's setting)."""
    import dataclasses

    model = _build("sasrec", dataclasses.replace(TINY, sasrec_max_len=5))
    seq = model.sequence(LONG, RECENT)
    assert seq.tolist() == [[5, 6, 0, 7, 8], [5, 6, 9, 10, 11], [0, 0, 0, 0, 12]]
    torch.testing.assert_close(model(LONG, RECENT), model.encode(seq)[:, -1:])
    # the loss predicts along the whole sequence read: 6 after 5 ... the next after 11
    nxt = torch.tensor([21, 22, 23])
    torch.testing.assert_close(model(LONG, RECENT, nxt), model.next_item_loss(seq, nxt))
    window_only = _build("sasrec")
    assert torch.equal(window_only.sequence(LONG, RECENT), RECENT)


def test_sasrec_samples_its_softmax_past_the_catalog_threshold() -> None:
    """Above model.full_softmax_max_items the loss is the target against K shared uniform
    negatives (P x (1 + K) logits, never P x N), computed as stated; below it, unchanged."""
    import dataclasses

    full = _build("sasrec", dataclasses.replace(TINY, full_softmax_max_items=N_ITEMS, sampled_negatives=6))
    sampled = _build("sasrec", dataclasses.replace(TINY, full_softmax_max_items=N_ITEMS - 1, sampled_negatives=6))
    recent, nxt = torch.tensor([[0, 7, 8]]), torch.tensor([21])
    hidden = full.encode(recent)
    logits = hidden[0, [1, 2]] @ full.item_emb.weight.T
    logits[:, 0] = -float("inf")
    torch.testing.assert_close(full(None, recent, nxt), F.cross_entropy(logits, torch.tensor([8, 21])))

    h, y = sampled.encode(recent)[0, [1, 2]], torch.tensor([8, 21])
    gen = torch.Generator().manual_seed(3)
    neg = torch.randint(1, N_ITEMS + 1, (6,), generator=torch.Generator().manual_seed(3))
    w = sampled.item_emb.weight
    by_hand = torch.cat([(h * w[y]).sum(-1, keepdim=True), h @ w[neg].T], 1)
    by_hand = by_hand.masked_fill(torch.cat([torch.zeros(2, 1, dtype=torch.bool), neg[None] == y[:, None]], 1),
                                  -float("inf"))
    torch.testing.assert_close(sampled.sampled_loss(h, y, 6, generator=gen),
                               F.cross_entropy(by_hand, torch.zeros(2, dtype=torch.long)))
    # the model's own loss takes the sampled path: finite, and only sampled rows, the
    # targets and the sequence's items get gradients (no catalog-wide logits)
    sampled.train()
    torch.manual_seed(0)
    loss = sampled(None, recent, nxt)
    loss.backward()
    touched = (sampled.item_emb.weight.grad.abs().sum(1) > 0).sum().item()
    assert torch.isfinite(loss) and touched <= 6 + 2 + 2, touched


def test_score_against_is_max_over_interests() -> None:
    users = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    items = torch.tensor([[0.0, 0.0], [0.6, 0.8], [-1.0, 0.0], [0.9, -0.1]])
    assert score_against(users, items).tolist() == [[0.0, pytest.approx(0.8), 0.0, pytest.approx(0.9)]]


def test_recency_positions() -> None:
    assert recency_positions(torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])).tolist() == [
        [0, 0, 2, 1, 0], [4, 3, 2, 1, 0]]


def test_unknown_model_type() -> None:
    with pytest.raises(ValueError, match="model_type"):
        build_model("bert4rec", TINY, make_store())
