"""The embedded reference LMaaS: a numpy base model with a repository of LoRA adapters (DESIGN 4), and
the merge service that serves it (`LocalService`, over any `MergeBackend`).

    from . import RepositoryConfig, build_repository
    repo = build_repository()                       # 110 adapters; built in seconds, then cached
    target = repo.targets()[0]                      # e.g. "ood:ner/news"
    pool = repo.pool(target, 20, seed=0)            # adapter names
    merger = repo.merger(pool)                      # reuse across candidates
    metrics = repo.evaluate(merger.merge(alpha, beta), target.validation)   # loss, accuracy, macro-F1

Names load on first use, so importing this package costs nothing beyond numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# name -> submodule that defines it
_LAZY: dict[str, str] = {
    "AdapterInfo": ".repository",
    "Repository": ".repository",
    "RepositoryConfig": ".repository",
    "Target": ".repository",
    "build_repository": ".repository",
    "default_cache_dir": ".repository",
    "Examples": ".tasks",
    "Task": ".tasks",
    "World": ".tasks",
    "Tokenizer": ".tokenizer",
    "LoraAdapter": ".model",
    "ModelWeights": ".model",
    "PoolMerger": ".merge",
    "LocalService": ".server",
    "serve": ".server",
    "FaultConfig": ".faults",
    "ServerLimits": ".faults",
    "MergeBackend": ".backend",
    "RepositoryBackend": ".repository_backend",
    "preset_id": ".repository_backend",
}

if TYPE_CHECKING:
    from .backend import MergeBackend
    from .faults import FaultConfig, ServerLimits
    from .merge import PoolMerger
    from .model import LoraAdapter, ModelWeights
    from .repository import (
        AdapterInfo,
        Repository,
        RepositoryConfig,
        Target,
        build_repository,
        default_cache_dir,
    )
    from .repository_backend import RepositoryBackend, preset_id
    from .server import LocalService, serve
    from .tasks import Examples, Task, World
    from .tokenizer import Tokenizer

__all__ = [
    "AdapterInfo",
    "Examples",
    "FaultConfig",
    "LocalService",
    "LoraAdapter",
    "MergeBackend",
    "ModelWeights",
    "PoolMerger",
    "Repository",
    "RepositoryBackend",
    "RepositoryConfig",
    "ServerLimits",
    "Target",
    "Task",
    "Tokenizer",
    "World",
    "build_repository",
    "default_cache_dir",
    "preset_id",
    "serve",
]


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
