"""Layered config: base + profiles + --set, typed, failing loudly on bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hymirec_udfs.core.config import Config, ConfigError, default_conf_dir, dump_config, load_config


def test_base_yaml_holds_every_default() -> None:
    base = yaml.safe_load((default_conf_dir() / "base.yaml").read_text())
    defaults = Config().to_dict()
    defaults.pop("profile")
    assert base == defaults


def test_profiles_override_base_and_set_overrides_last() -> None:
    cfg = load_config(["local"], ["train.epochs=7", "codebook.ks=[8, 8]", "embed.pooling=cls"])
    assert cfg.codebook.ks == [8, 8]
    assert cfg.train.epochs == 7
    assert cfg.embed.pooling == "cls"
    assert cfg.spark.master == "local[2]"  # from local.yaml
    assert cfg.train.lr == pytest.approx(0.001)  # from base.yaml
    assert cfg.profile == "local"


def test_every_shipped_profile_loads() -> None:
    for name in ("local", "cluster", "databricks", "gpu-tinyllama"):
        assert load_config([name]).profile == name
    assert load_config(["databricks"]).storage.catalog == "main"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    prof = tmp_path / "bad.yaml"
    prof.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'train\.epoch'"):
        load_config([str(prof)])
    with pytest.raises(ConfigError, match=r"--set: unknown key 'nope'"):
        load_config([], ["nope.x=1"])


def test_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    prof = tmp_path / "typed.yaml"
    prof.write_text("train:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"typed\.yaml: 'train\.epochs' must be an integer"):
        load_config([str(prof)])
    with pytest.raises(ConfigError, match=r"'tracking\.enabled' must be true/false"):
        load_config([], ["tracking.enabled=1"])
    with pytest.raises(ConfigError, match=r"'codebook\.ks\[1\]' must be an integer"):
        load_config([], ["codebook.ks=[4, x]"])


def test_missing_profile_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nosuch\.yaml"):
        load_config(["nosuch"])


def test_closed_choices_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"'embed\.pooling' must be one of"):
        load_config([], ["embed.pooling=max"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config([], ["train.epochs"])


def test_item_id_trained_only_without_an_id_table_is_refused_at_load() -> None:
    # At load time, before any stage runs: not after ingest, embedding and the codebook.
    needs = r"'model\.item_id_trained_only' needs 'model\.item_adapter=mlp_id', got 'mlp'"
    with pytest.raises(ConfigError, match=needs):
        load_config([], ["model.item_id_trained_only=true", "model.item_adapter=mlp"])
    cfg = load_config([], ["model.item_id_trained_only=true", "model.item_adapter=mlp_id"])
    assert cfg.model.item_id_trained_only and cfg.model.item_adapter == "mlp_id"


def test_dump_round_trips_and_hash_tracks_sections() -> None:
    cfg = load_config(["local"])
    assert yaml.safe_load(dump_config(cfg))["codebook"]["ks"] == [32, 32, 32]
    other = load_config(["local"], ["train.epochs=1"])
    assert cfg.section_hash("ingest") == other.section_hash("ingest")
    assert cfg.section_hash("train") != other.section_hash("train")


def test_derived_paths(tmp_path: Path) -> None:
    cfg = load_config([], [f"paths.work_dir={tmp_path}"])
    assert cfg.tables_uri == str(tmp_path / "tables")
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
