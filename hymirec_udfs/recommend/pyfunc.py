"""The trained model as an MLflow pyfunc other processes load by name.

``mlflow.pyfunc.load_model("models:/hymirec@champion")`` (or ``runs:/<train run>/model``)
gives a model whose ``predict`` takes users' histories and returns their interests and
top-K items, computed by the same code as the ``recommend`` stage
(:func:`hymirec_udfs.recommend.serving.score_batch`) over the item index of the catalog the
model was trained on; ``mlflow.pyfunc.spark_udf`` scores a DataFrame of histories with it.

Artefacts: the weights as ``model.safetensors`` with the model's configs in
``model.json`` (no pickle; ``training.checkpoints.export_safetensors``), the item store
beside it (embeddings, codes, codebook), the item index
(ranking vectors + ids), and ``settings.json`` (the ``recommend`` settings it scores
with). The project wheel of the code that logged it travels in ``code_paths``
(:mod:`hymirec_udfs.recommend.wheel`) and ``requirements.txt`` names it
(``code/hymirec-<version>+g<hash>.whl``) beside the other requirements, pinned to the
versions installed when it was logged: a restored environment runs the logging code.

Input: ``item_ids`` (array<string>, a user's history, oldest first), optional ``user_id``.
Output: ``user_id``, ``items`` (array<string>, best first), ``scores`` (array<float>),
``interests`` (array<array<float>>, L2-normalised), ``skipped`` (no known history item).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow.pyfunc

#: Requirements pinned at logging time (the installed versions of these distributions).
PINNED = ("torch", "transformers", "numpy", "pandas", "pyarrow", "scipy", "mlflow")


class HyMiRecPyfunc(mlflow.pyfunc.PythonModel):
    """Histories in, interests and top-K items out (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        from hymirec_udfs.core.config import Config, RecommendConfig
        from hymirec_udfs.evaluation.offline import LoadedModel
        from hymirec_udfs.recommend.serving import ItemIndex

        folder = Path(context.artifacts["checkpoint"])
        # safetensors weights (+ their .json config); a .pt state dict from older logs
        checkpoint = next(iter(sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.pt"))))
        self.loaded = LoadedModel(str(checkpoint))
        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.cfg = Config(recommend=RecommendConfig(**settings))
        self.index = ItemIndex(context.artifacts["item_index"], self.cfg.recommend.ann_nprobe)

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:  # noqa: ARG002
        import pandas as pd

        from hymirec_udfs.recommend.serving import score_batch

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "item_ids" not in frame.columns:
            raise ValueError(f"input needs an 'item_ids' column (a user's history), got {list(frame.columns)}")
        users = (frame["user_id"].astype(str).tolist() if "user_id" in frame.columns
                 else [str(i) for i in range(len(frame))])
        histories = [[str(i) for i in (h if h is not None else [])] for h in frame["item_ids"]]
        scored = score_batch(self.loaded, self.index, users, histories, self.cfg)
        return pd.DataFrame({
            "user_id": scored["user_id"],
            "items": [list(v) if v is not None else [] for v in scored["items"]],
            "scores": [[float(x) for x in v] if v is not None else [] for v in scored["scores"]],
            "interests": [[[float(x) for x in row] for row in v] if v is not None else [] for v in scored["interests"]],
            "skipped": scored["skipped"].astype(bool),
        })


def log_pyfunc(cfg: Any, checkpoint: str, work: Path, name: str = "model") -> Any:
    """Log the model at ``checkpoint`` as a pyfunc named ``name`` in the active MLflow run.

    ``work`` is a scratch directory for the artefacts (the item index is built there from
    the model's own item store: one pass over it, memory one chunk).
    """
    import importlib.metadata as md

    import pandas as pd
    from mlflow.models import infer_signature

    from hymirec_udfs.evaluation.offline import LoadedModel
    from hymirec_udfs.recommend.serving import write_item_index
    from hymirec_udfs.recommend.wheel import project_wheel
    from hymirec_udfs.training.checkpoints import export_safetensors

    shutil.rmtree(work, ignore_errors=True)  # never an earlier model's item index
    work.mkdir(parents=True)
    ckpt_dir = work / "checkpoint"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir()
    weights = export_safetensors(checkpoint, ckpt_dir)
    source_store = Path(checkpoint).parent / "item_store"
    if source_store.is_dir():
        shutil.copytree(source_store, ckpt_dir / "item_store")
    loaded = LoadedModel(str(weights))
    index_dir = write_item_index(loaded, loaded.store, work / "item_index", retrieval="exact", nlist=0, nprobe=0,
                                 meta={"source": "the model's own item store"})
    settings = work / "settings.json"
    settings.write_text(json.dumps({**_recommend_settings(cfg), "retrieval": "exact"}, sort_keys=True))

    example_ids = [str(i) for i in loaded.store.item_ids[: min(5, len(loaded.store.item_ids))]]
    example = pd.DataFrame({"user_id": ["example"], "item_ids": [example_ids]})
    model = HyMiRecPyfunc()

    class _Context:  # the artefacts as load_context will see them, to compute the example output
        artifacts = {"checkpoint": str(ckpt_dir), "item_index": str(index_dir), "settings": str(settings)}

    model.load_context(_Context())
    signature = infer_signature(example, model.predict(None, example))
    versions = []
    for dist in PINNED:
        try:
            versions.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:
            versions.append(dist)
    wheel = project_wheel(work.parent / "wheels")
    return mlflow.pyfunc.log_model(
        name=name, python_model=model, artifacts=_Context.artifacts, signature=signature, input_example=example,
        pip_requirements=[*versions, f"code/{wheel.name}"], code_paths=[str(wheel)],
    )


def _recommend_settings(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg.recommend)
