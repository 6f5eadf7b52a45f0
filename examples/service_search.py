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


async def main(max_evaluations: int = 200) -> float:
    """Search one out-of-domain pool of 5 adapters; return the best validation loss."""
    assert DEFAULT.denoise is not None and DEFAULT.scale is not None
    config = attrs.evolve(
        DEFAULT,
        denoise=attrs.evolve(DEFAULT.denoise, max_evaluations=max_evaluations // 2),
        scale=attrs.evolve(DEFAULT.scale, max_evaluations=max_evaluations // 2),
    )
    async with LocalService() as service, Scheduler(budget=Budget(tokens=2_000_000)) as scheduler:
        async with MergeServiceClient(service.url, scheduler=scheduler) as client:
            preset = next(p for p in await client.presets() if p.preset_id.endswith("/pool-5"))
            target = preset.preset_id.split("/pool-")[0]
            validation = await client.create_session(
                preset.preset_id, query_plus={"dataset": f"{target}:validation"}
            )
            held_out = await client.create_session(
                preset.preset_id, query_plus={"dataset": f"{target}:held_out"}
            )
            objective = ServiceObjective(client, validation, held_out)
            result = await EvoMerge(objective, preset.adapter_count, config).run()
        print(f"{preset.preset_id}: best validation loss {result.loss:.4f}")
        print(f"beta = {result.beta.round(3).tolist()}")
        print(f"spent {scheduler.spent().tokens:,} tokens in {scheduler.metrics().requests} requests")
    return result.loss


if __name__ == "__main__":
    anyio.run(main)
