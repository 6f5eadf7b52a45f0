"""Merge your own API models in output space, end to end: score, search, build, serve.

1. score: every pool model (and a reference) answers each labelled validation and held-out prompt once
   through an OpenAI-compatible endpoint with logprobs, under a hard token budget (checked before the
   first request), with progress;
2. search: the two-stage Evo-Merging search on the cached scores (no query at all);
3. build: `MergedSpec.from_result` turns the search result into the merged model, in one call, recording
   where its models live;
4. serve: the merged model behind an OpenAI-compatible endpoint (`evomerge serve merged.json` does the
   same from the command line) and one chat completion through it.

The embedded reference service's OpenAI-compatible route stands in for your endpoint: point `BASE_URL`
at vLLM, llama.cpp, Ollama or the LiteLLM proxy, name your models in `POOL` and `REFERENCE`, and give
your own labelled prompts. `python examples/output_merge.py`
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import anyio

from evomerge_sdk import (
    Budget,
    EvoMerge,
    LabelledExamples,
    MergedModelServer,
    MergedSpec,
    OutputSpaceObjective,
    Scheduler,
    ScoringConfig,
    ScoringProgress,
    collect_scores,
    load_provider,
    open_merged,
    preset,
)
from evomerge_sdk.local import LocalService


def _stand_in_data(service: LocalService, n_models: int) -> tuple[list[str], dict[str, LabelledExamples]]:
    """Your part: model names and labelled prompts. Here, the embedded repository's first target."""
    repository = service.repository
    target = repository.targets()[0]
    tokens = repository.tokenizer.tokens
    options = [tokens[int(i)] for i in target.validation.answer_ids]

    def labelled(examples: object) -> LabelledExamples:
        prompts = list(examples.prompts)  # type: ignore[attr-defined]
        answers = [tokens[int(i)] for i in examples.labels]  # type: ignore[attr-defined]
        return LabelledExamples.of(prompts, answers, options)

    pool = list(repository.pool(target, n_models, 0))
    return pool, {"validation": labelled(target.validation), "held_out": labelled(target.holdout)}


async def main(out: Path = Path("output-merge"), budget_tokens: int = 400_000) -> str:
    """Run the four steps; return the served model's answer to one prompt."""
    await anyio.Path(out).mkdir(parents=True, exist_ok=True)
    async with LocalService(pool_sizes=(5,)) as service:  # stands in for your endpoint
        base_url = f"{service.url}/v1"
        pool, splits = _stand_in_data(service, 5)
        reference = "base"  # a model every pool model was fine-tuned from, or MEAN_REFERENCE
        scoring = ScoringConfig(method="logprobs", top_logprobs=20)

        # 1. score, under a hard budget that is checked before the first request.
        provider = load_provider("openai", base_url=base_url)  # OPENAI_API_KEY etc. from the environment
        try:
            async with Scheduler(budget=Budget(tokens=budget_tokens), max_concurrency=16) as scheduler:

                def show(progress: ScoringProgress) -> None:
                    if progress.done == progress.total:
                        print(f"  scored {progress.total:,} prompts, {progress.tokens:,} tokens")

                tables = {
                    split: await collect_scores(
                        scheduler, provider, [*pool, reference], examples, scoring, on_progress=show
                    )
                    for split, examples in splits.items()
                }
                print(f"scoring spent {scheduler.spent().tokens:,} of {budget_tokens:,} tokens")
        finally:
            await provider.aclose()

        # 2. search on the cached scores: no query.
        objective = OutputSpaceObjective(
            tables["validation"].select(pool, reference), tables["held_out"].select(pool, reference)
        )
        result = await EvoMerge(objective, len(pool), preset("default/no_denoising")).run()
        print(f"search: validation loss {result.loss:.4f} after {result.evaluations} evaluations (0 queries)")

        # 3. build the merged model in one call.
        spec = MergedSpec.from_result(
            result,
            pool,
            answer_set=splits["validation"].answer_set.options,
            reference=reference,
            scoring=scoring,
            base_url=base_url,
            name="my-merged-model",
        )
        print(f"the merged model queries {len(spec.queried_models())} of {len(pool) + 1} models")

        # 4. save it, serve it (what `evomerge serve merged.json` does) and ask it once, as any client would.
        async with (
            open_merged(spec) as merged,
            MergedModelServer(merged) as server,
            aiohttp.ClientSession() as http,
        ):
            print(f"wrote {merged.save(out / 'merged.json')}")
            prompt = splits["validation"].prompts[0][-1].content
            body = {"model": spec.name, "messages": [{"role": "user", "content": prompt}]}
            async with http.post(f"{server.url}/v1/chat/completions", json=body) as reply:
                answer = (await reply.json())["choices"][0]["message"]["content"]
        print(f"served at {server.url}/v1: {prompt!r} -> {answer!r}")
        return str(answer)


if __name__ == "__main__":
    anyio.run(main)
