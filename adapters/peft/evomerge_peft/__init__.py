"""evomerge-peft: the Evo-Merging merge service over Hugging Face PEFT LoRA adapters (torch; CPU or CUDA).

Load a local base model folder and a pool of PEFT LoRA adapter folders (`load_base`, `load_pool`: every
check up front, nothing half-loaded), merge them with the operator of DESIGN 1.1 in torch
(`merge_module`, paper or cat form), score merges fast in one preallocated LoRA slot (`Scorer`),
write a merge as a PEFT adapter folder that PEFT and vLLM load (`write_adapter`), and compare with PEFT's
own `add_weighted_adapter` merges (`peft_weighted_merge`). `build_world` makes the tiny real-format world
the tests and benchmarks use. No model hub: every path is a local folder.
"""

from ._evaluate import Example, Scorer, TokenisedSet, first_token_accuracy, tokenise
from ._materialize import merged_tensors, write_adapter
from ._merge import MERGE_FORMS, MergeForm, keep_counts, merge_module
from ._pool import AdapterPool, Base, load_base, load_pool
from ._whitebox import PEFT_COMBINATIONS, peft_weighted_merge
from ._world import WORLD_VERSION, World, WorldConfig, build_world, default_world_dir

__all__ = [
    "MERGE_FORMS",
    "PEFT_COMBINATIONS",
    "WORLD_VERSION",
    "AdapterPool",
    "Base",
    "Example",
    "MergeForm",
    "Scorer",
    "TokenisedSet",
    "World",
    "WorldConfig",
    "build_world",
    "default_world_dir",
    "first_token_accuracy",
    "keep_counts",
    "load_base",
    "load_pool",
    "merge_module",
    "merged_tensors",
    "peft_weighted_merge",
    "tokenise",
    "write_adapter",
]
