"""Checkpoints, RNG state and the per-step metrics file, shared by stage 1 and stage 2.

Checkpoints are written to a temporary file and moved into place with ``os.replace``, so a
kill never leaves half a checkpoint; every RNG (torch, CUDA, numpy, Python) is saved and
restored so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
CHECKPOINT_FORMAT = 1


def atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[1].tolist(), "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "gauss": float(np_state[4])},
        "python": random.getstate(),
        "negatives": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(np_state["key"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["negatives"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (tensors, configs and plain values only),
    or a ``.safetensors`` export (:func:`export_safetensors`: weights plus its ``.json``)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        meta = json.loads(Path(path).with_suffix(".json").read_text())
        return {**meta, "model_state": load_file(str(path), device=str(map_location))}
    return torch.load(path, map_location=map_location, weights_only=True)


#: What an export keeps of a checkpoint besides the weights (no optimiser, RNG or history).
EXPORTED_KEYS = ("format", "model_type", "model_config", "dmil_config", "train_config", "item_store_path",
                 "catalog_shape", "max_long", "recent_window")


def export_safetensors(checkpoint: str, out_dir: str | Path, stem: str = "model") -> Path:
    """Write ``checkpoint``'s weights as ``<stem>.safetensors`` and its configuration as
    ``<stem>.json`` (no pickle: loadable by any safetensors reader); returns the weights path.
    :func:`load_checkpoint` reads the pair back."""
    from safetensors.torch import save_file

    ckpt = load_checkpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors sharing storage (tied weights); load_state_dict re-ties them
    state = {k: v.detach().clone().contiguous() for k, v in ckpt["model_state"].items()}
    weights = out / f"{stem}.safetensors"
    save_file(state, str(weights))
    weights.with_suffix(".json").write_text(json.dumps({k: ckpt[k] for k in EXPORTED_KEYS if k in ckpt},
                                                       sort_keys=True, default=str))
    return weights


def append_metrics(metrics_path: Optional[str], record: dict[str, Any]) -> None:
    """Append one JSON line to the metrics file (rank 0 only; no-op without a path)."""
    if metrics_path:
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines logged after ``step`` (a run killed after its last checkpoint
    logged steps the resumed run will log again)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) > step:
                    continue
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            kept.append(line)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.writelines(kept)
    os.replace(tmp, path)
