"""The residual codebook math on small clustered data: no Spark, CPU only, a few seconds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hymirec_udfs.codebook.blocks import CodebookInputError, Metric
from hymirec_udfs.codebook.residual import FitReport, ResidualCodebook, decode, decode_torch, encode, fit_residual_codebook, residual_trace
from hymirec_udfs.codebook.kmeans import balanced_spherical_kmeans, plain_kmeans
from hymirec_udfs.codebook.serialize import codebook_from_rows, codebook_to_rows, load_npz, save_npz
from hymirec_udfs.codebook.stats import codebook_stats


def clustered(n: int, d: int, *, clusters: int = 6, seed: int = 0, weights: list[float] | None = None) -> np.ndarray:
    """Unit vectors around ``clusters`` random directions (optionally uneven sizes)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    p = None if weights is None else np.asarray(weights) / np.sum(weights)
    x = centers[rng.choice(clusters, size=n, p=p)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


Fitted = tuple[ResidualCodebook, FitReport]


@pytest.fixture(scope="module")
def emb() -> np.ndarray:
    return clustered(480, 16)


@pytest.fixture(scope="module")
def fitted(emb: np.ndarray) -> tuple[ResidualCodebook, FitReport]:
    return fit_residual_codebook(emb, [12, 8, 8], iters=15, seed=3)


# --- the projection residual ---------------------------------------------------------


def test_full_precision_residual_is_orthogonal_to_its_centroid(fitted: Fitted, emb: np.ndarray) -> None:
    book, _ = fitted
    trace = residual_trace(book, emb, round_coefs=False)
    for layer in range(book.num_layers):
        dots = np.einsum("nd,nd->n", trace.residuals[layer + 1], trace.centroids_used[layer])
        assert np.abs(dots).max() < 1e-5, f"layer {layer}"
    # Not trivially orthogonal: each residual had a real component along its centroid.
    assert np.abs(trace.coefs).min() > 1e-3


def test_fp16_coefs_are_representable_and_orthogonality_only_approximate(fitted: Fitted, emb: np.ndarray) -> None:
    book, _ = fitted
    trace = residual_trace(book, emb, round_coefs=True)
    np.testing.assert_array_equal(trace.coefs, trace.coefs.astype(np.float16).astype(np.float32))
    for layer in range(book.num_layers):
        dots = np.abs(np.einsum("nd,nd->n", trace.residuals[layer + 1], trace.centroids_used[layer]))
        # |r' . c| = |a - fp16(a)| <= half an fp16 ulp of a (2**-11 relative) plus float32 noise.
        bound = np.abs(trace.coefs[:, layer]) * 2.0**-11 + 1e-6
        assert np.all(dots <= bound), f"layer {layer}"


def test_residual_norms_never_grow(fitted: Fitted, emb: np.ndarray) -> None:
    book, _ = fitted
    trace = residual_trace(book, emb)
    norms = np.linalg.norm(trace.residuals, axis=2)  # (L + 1, n)
    np.testing.assert_allclose(norms[0], 1.0, atol=1e-6)
    assert np.all(np.diff(norms, axis=0) <= 1e-6)
    # And they really shrink on clustered data.
    assert norms[-1].mean() < 0.8 * norms[0].mean()


def test_reconstruction_error_is_exactly_the_last_residual(fitted: Fitted, emb: np.ndarray) -> None:
    book, _ = fitted
    codes, coefs, recon_cos = encode(book, emb)  # the stored, fp16-rounded coefficients
    trace = residual_trace(book, emb)
    np.testing.assert_array_equal(codes, trace.codes)
    recon = sum(coefs[:, [layer]] * book.centroids[layer].numpy()[codes[:, layer]] for layer in range(3))
    np.testing.assert_allclose(trace.residuals[0] - recon, trace.residuals[-1], atol=1e-6)
    # recon_cosine is the cosine of what decode returns.
    decoded = decode(book, codes, coefs)
    np.testing.assert_allclose(np.linalg.norm(decoded, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.einsum("nd,nd->n", decoded, emb), recon_cos, atol=1e-5)
    assert codes.dtype == np.int16 and coefs.dtype == np.float32 and recon_cos.dtype == np.float32


def test_more_layers_reconstruct_better(emb: np.ndarray) -> None:
    one, _ = fit_residual_codebook(emb, [12], iters=10, seed=3)
    three, _ = fit_residual_codebook(emb, [12, 8, 8], iters=10, seed=3)
    error_one = 1.0 - encode(one, emb)[2].mean()
    error_three = 1.0 - encode(three, emb)[2].mean()
    assert error_three < 0.7 * error_one


def test_exact_reconstruction_when_k_is_the_basepool_size() -> None:
    x = clustered(40, 8, seed=5)
    book, report = fit_residual_codebook(x, [40], iters=5, seed=0)
    np.testing.assert_array_equal(report.layers[0].cluster_sizes, np.ones(40))
    codes, coefs, recon_cos = encode(book, x)
    assert sorted(codes[:, 0].tolist()) == list(range(40))
    np.testing.assert_allclose(recon_cos, 1.0, atol=1e-6)
    np.testing.assert_allclose(coefs[:, 0], 1.0, atol=1e-3)


# --- balance ------------------------------------------------------------------------


def test_balanced_fit_respects_capacity_where_plain_fit_does_not() -> None:
    # 70 % of the items in one direction: unconstrained k-means piles clusters up there.
    x = clustered(500, 12, clusters=4, seed=1, weights=[0.7, 0.1, 0.1, 0.1])
    k = 9
    cap = math.ceil(500 / k)  # 56
    balanced = balanced_spherical_kmeans(x, k, iters=15, seed=0)
    assert balanced.capacity == cap
    assert int(balanced.cluster_sizes.max()) <= cap
    assert int(balanced.cluster_sizes.min()) >= 1
    assert int(balanced.cluster_sizes.sum()) == 500
    np.testing.assert_array_equal(torch.bincount(balanced.assignment, minlength=k), balanced.cluster_sizes)

    unbalanced = balanced_spherical_kmeans(x, k, iters=15, seed=0, balance=False)
    assert unbalanced.capacity is None
    assert int(unbalanced.cluster_sizes.max()) > cap

    slack = balanced_spherical_kmeans(x, k, iters=15, seed=0, capacity_slack=1.5)
    assert slack.capacity == math.ceil(1.5 * 500 / k) and int(slack.cluster_sizes.max()) <= slack.capacity


def test_centroids_are_normalised_means_of_their_members() -> None:
    x = clustered(300, 10, seed=2)
    result = balanced_spherical_kmeans(x, 5, iters=8, seed=0)
    centroids = result.centroids.numpy()
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)
    assignment = result.assignment.numpy()
    for c in range(5):
        mean = x[assignment == c].sum(axis=0)
        np.testing.assert_allclose(centroids[c], mean / np.linalg.norm(mean), atol=1e-5)
    assert result.iterations <= 8 and len(result.objective_history) == result.iterations
    # Lloyd with a fixed capacity still improves on its seeding.
    assert result.objective_history[-1] >= result.objective_history[0]


def test_fit_report_records_capacity_per_layer(fitted: Fitted) -> None:
    _, report = fitted
    assert report.n_fit == 480 and report.balanced and report.metric is Metric.COSINE
    for layer, k in zip(report.layers, [12, 8, 8]):
        assert layer.capacity == math.ceil(480 / k)
        assert layer.cluster_sizes.max() <= layer.capacity and layer.cluster_sizes.sum() == 480
        assert 1.0 <= layer.max_cluster_over_mean <= layer.capacity * k / 480
    assert 0.5 < report.recon_cosine_mean <= 1.0
    as_dict = report.to_dict()
    assert as_dict["metric"] == "cosine" and len(as_dict["layers"]) == 3


def test_empty_clusters_are_reseeded() -> None:
    # Two distinct directions, ten copies each, three clusters: unconstrained assignment
    # leaves a duplicate centroid empty, which must be re-seeded, not kept empty.
    base = np.eye(4, dtype=np.float32)[:2]
    x = np.repeat(base, 10, axis=0)
    result = balanced_spherical_kmeans(x, 3, iters=5, seed=0, balance=False)
    assert int(result.cluster_sizes.min()) >= 1


def test_basepool_sample_is_fitted_only(emb: np.ndarray) -> None:
    book, report = fit_residual_codebook(emb, [8, 4], iters=5, seed=0, basepool_size=200)
    assert report.n_input == 480 and report.n_fit == 200
    assert report.layers[0].cluster_sizes.sum() == 200
    assert encode(book, emb)[0].shape == (480, 2)


# --- Euclidean ablation ---------------------------------------------------------------


def test_euclidean_variant_subtracts_centroid_and_stores_codes_only(emb: np.ndarray) -> None:
    book, report = fit_residual_codebook(emb, [10, 6], metric="euclidean", iters=10, seed=0)
    assert book.metric is Metric.EUCLIDEAN and not report.balanced
    trace = residual_trace(book, emb)
    for layer in range(2):
        np.testing.assert_allclose(
            trace.residuals[layer + 1], trace.residuals[layer] - trace.centroids_used[layer], atol=1e-6
        )
    codes, coefs, recon_cos = encode(book, emb)
    np.testing.assert_array_equal(coefs, 1.0)
    assert recon_cos.mean() > 0.5
    stats = codebook_stats(codes, book.ks, dim=16, with_coefs=False)
    assert stats["bytes_per_item"] == 2.0


def test_plain_kmeans_centroids_are_means() -> None:
    x = clustered(200, 6, seed=4) * 3.0  # not unit-norm: Euclidean k-means must not normalise
    result = plain_kmeans(x, 4, iters=10, seed=0)
    assignment = result.assignment.numpy()
    for c in range(4):
        np.testing.assert_allclose(result.centroids[c].numpy(), x[assignment == c].mean(axis=0), atol=1e-5)
    assert result.objective_history[-1] <= result.objective_history[0]


# --- determinism -------------------------------------------------------------------------


def test_same_seed_same_codes_other_seed_differs(emb: np.ndarray) -> None:
    a, _ = fit_residual_codebook(emb, [12, 8], iters=10, seed=11)
    b, _ = fit_residual_codebook(emb, [12, 8], iters=10, seed=11)
    c, _ = fit_residual_codebook(emb, [12, 8], iters=10, seed=12)
    for la, lb in zip(a.centroids, b.centroids):
        torch.testing.assert_close(la, lb, rtol=0, atol=0)
    np.testing.assert_array_equal(encode(a, emb)[0], encode(b, emb)[0])
    assert not torch.equal(a.centroids[0], c.centroids[0])
    assert not np.array_equal(encode(a, emb)[0], encode(c, emb)[0])


# --- devices and input types ------------------------------------------------------------


def test_torch_input_float64_matches_numpy_input(emb: np.ndarray) -> None:
    from_numpy, _ = fit_residual_codebook(emb, [6], iters=5, seed=0)
    from_torch, _ = fit_residual_codebook(torch.from_numpy(emb).double(), [6], iters=5, seed=0, device="cpu")
    np.testing.assert_array_equal(encode(from_numpy, emb)[0], encode(from_torch, torch.from_numpy(emb))[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fit_and_encode_agree_with_cpu(emb: np.ndarray) -> None:
    cpu, cpu_report = fit_residual_codebook(emb, [12, 8], iters=10, seed=3, device="cpu")
    gpu, gpu_report = fit_residual_codebook(emb, [12, 8], iters=10, seed=3, device="cuda")
    assert gpu_report.layers[0].cluster_sizes.max() <= math.ceil(480 / 12)
    assert gpu.centroids[0].device.type == "cpu"  # codebooks always come back on CPU
    # Float summation order differs between devices, so compare outcomes, not bits.
    codes_cpu, _, recon_cpu = encode(cpu, emb)
    codes_gpu, _, recon_gpu = encode(gpu, torch.from_numpy(emb).cuda())
    assert (codes_cpu[:, 0] == codes_gpu[:, 0]).mean() > 0.95
    assert abs(float(recon_cpu.mean()) - float(recon_gpu.mean())) < 0.01


# --- decode inside a model -------------------------------------------------------------


def test_decode_torch_matches_decode_on_batched_shapes_and_is_differentiable(fitted: Fitted, emb: np.ndarray) -> None:
    book, _ = fitted
    codes, coefs, _ = encode(book, emb[:24])
    stacked = book.stacked_centroids().requires_grad_(True)
    assert stacked.shape == (3, 12, 16)
    out = decode_torch(stacked, torch.from_numpy(codes.astype(np.int64)).view(4, 6, 3),
                       torch.from_numpy(coefs).view(4, 6, 3))
    assert out.shape == (4, 6, 16)
    np.testing.assert_allclose(out.detach().reshape(24, 16).numpy(), decode(book, codes, coefs), atol=1e-6)
    out.sum().backward()
    assert stacked.grad is not None and float(stacked.grad.abs().sum()) > 0


# --- persistence ---------------------------------------------------------------------------


def test_rows_round_trip(fitted: Fitted, emb: np.ndarray) -> None:
    book, report = fitted
    rows = codebook_to_rows(book, "v1", report)
    assert len(rows) == 12 + 8 + 8
    assert set(rows[0]) == {"version", "layer", "code", "centroid", "metric", "cluster_size_at_fit"}
    assert rows[0]["metric"] == "cosine" and rows[0]["layer"] == 0 and rows[-1]["layer"] == 2
    assert sum(r["cluster_size_at_fit"] for r in rows if r["layer"] == 1) == 480
    back = codebook_from_rows(list(reversed(rows)))
    for a, b in zip(book.centroids, back.centroids):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    np.testing.assert_array_equal(encode(back, emb)[0], encode(book, emb)[0])


def test_rows_with_two_versions_or_missing_codes_are_rejected(fitted: Fitted) -> None:
    book, report = fitted
    rows = codebook_to_rows(book, "v1", report)
    with pytest.raises(CodebookInputError, match="versions"):
        codebook_from_rows(rows + [dict(rows[0], version="v2")])
    with pytest.raises(CodebookInputError, match="layer 0 is missing codes \\[3\\]"):
        codebook_from_rows([r for r in rows if not (r["layer"] == 0 and r["code"] == 3)])


def test_npz_round_trip(fitted: Fitted, emb: np.ndarray, tmp_path: Path) -> None:
    book, _ = fitted
    path = tmp_path / "codebook.npz"
    save_npz(book, path)
    back = load_npz(path)
    assert back.metric is Metric.COSINE and back.dim == 16 and back.ks == [12, 8, 8]
    for a, b in zip(book.centroids, back.centroids):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, value, message",
    [
        ([3, 7], 0.0, r"2 all-zero row\(s\) \(first row indices: \[3, 7\]\)"),
        ([5], np.nan, r"1 row\(s\) containing NaN or Inf \(first row indices: \[5\]\)"),
        ([0, 9, 11], np.inf, r"3 row\(s\) containing NaN or Inf \(first row indices: \[0, 9, 11\]\)"),
    ],
)
def test_bad_vectors_are_named(emb: np.ndarray, rows: list[int], value: float, message: str) -> None:
    bad = emb[:40].copy()
    bad[rows] = value
    with pytest.raises(CodebookInputError, match=message):
        fit_residual_codebook(bad, [4])
    book, _ = fit_residual_codebook(emb[:40], [4], iters=2)
    with pytest.raises(CodebookInputError, match=message):
        encode(book, bad)


def test_dimension_mismatch_names_both_dims(fitted: Fitted) -> None:
    book, _ = fitted
    with pytest.raises(CodebookInputError, match="emb has dimension 8 but the codebook has dimension 16"):
        encode(book, clustered(10, 8))


def test_k_larger_than_basepool_names_k_layer_and_n(emb: np.ndarray) -> None:
    with pytest.raises(CodebookInputError, match="layer 1 asks for k=60 centroids but the basepool has only n=50 rows"):
        fit_residual_codebook(emb, [4, 60], basepool_size=50)


def test_empty_and_malformed_input(fitted: Fitted) -> None:
    book, _ = fitted
    with pytest.raises(CodebookInputError, match="empty"):
        fit_residual_codebook(np.zeros((0, 16), dtype=np.float32), [4])
    with pytest.raises(CodebookInputError, match="empty"):
        encode(book, np.zeros((0, 16), dtype=np.float32))
    with pytest.raises(CodebookInputError, match="ks is empty"):
        fit_residual_codebook(clustered(10, 4), [])
    with pytest.raises(CodebookInputError, match="2-D"):
        encode(book, np.ones(16, dtype=np.float32))
    with pytest.raises(CodebookInputError, match="unknown metric 'dot'"):
        fit_residual_codebook(clustered(10, 4), [2], metric="dot")
    with pytest.raises(CodebookInputError, match=r"layer 1 has 1 code\(s\) outside \[0, 8\)"):
        decode(book, np.array([[0, 8, 0]]), np.ones((1, 3), dtype=np.float32))
    with pytest.raises(CodebookInputError, match="capacity_slack"):
        balanced_spherical_kmeans(clustered(10, 4), 2, capacity_slack=0.5)


# --- statistics (hand-computed) ----------------------------------------------------------------


def test_stats_on_hand_made_codes() -> None:
    codes = np.array([[0, 0], [0, 0], [1, 2], [0, 1]])
    stats = codebook_stats(codes, [2, 3], recon_cosine=np.array([1.0, 0.9, 0.8, 0.5]), dim=8)
    expected = {
        # layer 0: sizes (3, 1) of k=2; 2 * (9 + 1) / 16 = 1.25; exp(H(3/4, 1/4)) = 1.7548
        "layer0_cluster_size_min": 1.0,
        "layer0_cluster_size_mean": 2.0,
        "layer0_cluster_size_max": 3.0,
        "layer0_imbalance": 1.25,
        "layer0_used_fraction": 1.0,
        "layer0_perplexity": 1.7547654,
        # layer 1: sizes (2, 1, 1) of k=3; 3 * 6 / 16 = 1.125; exp(H(1/2, 1/4, 1/4)) = 2 sqrt 2
        "layer1_cluster_size_min": 1.0,
        "layer1_cluster_size_max": 2.0,
        "layer1_imbalance": 1.125,
        "layer1_perplexity": 2.8284271,
        # (0, 0) twice: 2 of 4 items share their tuple
        "collision_rate": 0.5,
        # two uint8 codes + two fp16 coefficients; 8 x 4 B fp32 and 8 x 2 B bf16
        "bytes_per_item": 6.0,
        "compression_vs_fp32": 32 / 6,
        "compression_vs_bf16": 16 / 6,
        "recon_cosine_mean": 0.8,
        "recon_cosine_p5": 0.545,  # linear interpolation between 0.5 and 0.8 at 0.15
        "recon_cosine_min": 0.5,
        "n_items": 4.0,
    }
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-6), key


def test_stats_unused_codes_and_wide_codes() -> None:
    codes = np.array([[0], [0], [0], [0]])
    stats = codebook_stats(codes, [300])
    assert stats["layer0_imbalance"] == pytest.approx(300.0)  # everything in one code: k
    assert stats["layer0_used_fraction"] == pytest.approx(1 / 300)
    assert stats["layer0_perplexity"] == pytest.approx(1.0)
    assert stats["collision_rate"] == 1.0
    assert stats["bytes_per_item"] == 2 + 2  # k=300 needs a uint16 code
    assert "compression_vs_fp32" not in stats and "recon_cosine_mean" not in stats
