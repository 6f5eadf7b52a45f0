"""The merged model: what a search found, as something to use and to serve.

* `spec`: `MergedSpec`, the saved merge (mode, pool, vectors, where its models live), `load_spec`,
  `save_spec`;
* `model`: `MergedModel`, one class per mode (`OutputMergedModel`, `ProviderMergedModel`), and `open_merged`;
* `server`: `MergedModelServer`, the merged model (any `ChatModel`) behind an OpenAI-compatible endpoint.
"""

from __future__ import annotations

from .model import MergedModel, OutputMergedModel, ProviderMergedModel, open_merged
from .server import ChatModel, MergedModelServer, serve_merged
from .spec import MERGED_FORMAT, MergedSpec, load_spec, save_spec

__all__ = [
    "MERGED_FORMAT",
    "ChatModel",
    "MergedModel",
    "MergedModelServer",
    "MergedSpec",
    "OutputMergedModel",
    "ProviderMergedModel",
    "load_spec",
    "open_merged",
    "save_spec",
    "serve_merged",
]
