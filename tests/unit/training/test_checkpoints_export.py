"""safetensors export of a checkpoint: weights without pickle, configs beside them."""

from __future__ import annotations

import torch

from hymirec_udfs.training.checkpoints import EXPORTED_KEYS, export_safetensors, load_checkpoint


def test_export_round_trip_keeps_weights_and_config_and_drops_training_state(tmp_path) -> None:
    shared = torch.randn(5, 3)
    ckpt = {"format": 3, "model_type": "hymirec", "model_config": {"interests": 2, "item_adapter": "none"},
            "dmil_config": {"enabled": True}, "train_config": {"epochs": 1}, "item_store_path": "/x/item_store",
            "catalog_shape": [4, 3], "max_long": 10, "recent_window": 5,
            "model_state": {"emb.weight": shared, "head.weight": shared, "bias": torch.zeros(3)},  # tied weights
            "optimizer": {"state": {}}, "rng": [b"x"]}
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    weights = export_safetensors(str(path), tmp_path / "export")
    assert weights.name == "model.safetensors" and weights.with_suffix(".json").is_file()
    back = load_checkpoint(str(weights))
    assert set(back) == set(EXPORTED_KEYS) | {"model_state"}
    assert back["model_config"] == ckpt["model_config"] and back["catalog_shape"] == [4, 3]
    for name, tensor in ckpt["model_state"].items():
        assert torch.equal(back["model_state"][name], tensor), name
    assert b"pickle" not in weights.read_bytes()[:64] and weights.read_bytes()[8:9] == b"{"  # a safetensors header
