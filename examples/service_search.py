"""Drive a merge service from async code: a budgeted Evo-Merging search over HTTP.

Runs against the embedded reference service on a free loopback port; point `MergeServiceClient` at
another server's URL to drive it instead. `python examples/service_search.py`
"""

from __future__ import annotations

import anyio
import attrs

from evomerge_sdk import (
    DEFAULT,
    Budget,
    EvoMerge,
    MergeServiceClient,
    Scheduler,
    ServiceObjective,
)
from evomerge_sdk.local import LocalService


async def main(max_evaluations: int = 200, reference_only: bool = False) -> float:
    """Search one out-of-domain pool of 5 adapters; return the best validation loss. `reference_only`
    makes the embedded service answer as the authors' reference service does."""
    assert DEFAULT.scale is not None  # the default is one stage: beta, on minibatches
    config = attrs.evolve(DEFAULT, scale=attrs.evolve(DEFAULT.scale, max_evaluations=max_evaluations))
    async with (
        LocalService(reference_only=reference_only) as service,
        Scheduler(budget=Budget(tokens=2_000_000)) as scheduler,
    ):
        # Each evaluation is reserved as examples x tokens_per_example (the embedded world's examples
        # are 12 tokens; a real service's are up to its cutoff_len, 2,048 by default).
        async with MergeServiceClient(service.url, scheduler=scheduler, tokens_per_example=16) as client:
            preset = next(p for p in await client.presets() if p.preset_id.endswith("/pool-5"))
            target = preset.preset_id.split("/pool-")[0]
            validation = await client.create_session(
                preset.preset_id, query_plus={"dataset": f"{target}:validation"}
            )
            held_out = await client.create_session(
                preset.preset_id, query_plus={"dataset": f"{target}:held_out"}
            )
            objective = ServiceObjective(client, validation, held_out)
            result = await EvoMerge(objective, validation.adapter_count, config).run()
        print(f"{preset.preset_id}: best validation loss {result.loss:.4f}")
        print(f"beta = {result.beta.round(3).tolist()}")
        print(f"spent {scheduler.spent().tokens:,} tokens in {scheduler.metrics().requests} requests")
    return result.loss


if __name__ == "__main__":
    anyio.run(main)
