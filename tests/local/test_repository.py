"""The embedded repository: deterministic builds, the cache, targets, pools and bad input."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs
import numpy as np
import pytest
import structlog

import evomerge_sdk.local.repository as repository_module
from evomerge_sdk.errors import ConfigError
from evomerge_sdk.local.repository import Repository, RepositoryConfig, build_repository, default_cache_dir

SMALL = RepositoryConfig.small()


def all_weights(r: Repository) -> list[np.ndarray]:
    base = [getattr(r.base, k) for k in ("embedding", "w1", "b1", "w2", "b2", "w3", "b3")]
    loras = [m for name in r.adapter_names for lora in [r.lora(name)] for m in (*lora.a, *lora.b)]
    return base + loras


def assert_same_weights(a: Repository, b: Repository) -> None:
    for x, y in zip(all_weights(a), all_weights(b), strict=True):
        np.testing.assert_array_equal(x, y)


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("repository-*.npz"))


def test_same_seed_gives_bitwise_identical_weights(repo: Repository) -> None:
    again = build_repository(SMALL, use_cache=False)
    assert_same_weights(repo, again)
    other = build_repository(RepositoryConfig.small(seed=1), use_cache=False)
    assert not np.array_equal(other.base.w1, repo.base.w1)
    # The fingerprint names the world: equal for the same build, different for another one.
    assert repo.fingerprint() == again.fingerprint() != other.fingerprint()
    assert len(repo.fingerprint()) == 16


def test_cache_round_trip_is_private_and_skips_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_repository(SMALL, tmp_path)
    (path,) = cache_files(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))

    def no_training(*args: object) -> None:
        raise AssertionError("a cached repository must not train")

    monkeypatch.setattr(repository_module, "_train", no_training)
    assert_same_weights(first, build_repository(SMALL, tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-config"])
def test_unusable_cache_file_is_rebuilt(tmp_path: Path, damage: str) -> None:
    good = build_repository(SMALL, tmp_path)
    (path,) = cache_files(tmp_path)
    if damage == "garbage":
        path.write_bytes(b"not an npz file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        other = tmp_path / "other"
        build_repository(RepositoryConfig.small(seed=5), other)
        os.replace(cache_files(other)[0], path)
    with structlog.testing.capture_logs() as logs:
        rebuilt = build_repository(SMALL, tmp_path)
    assert any(entry["event"] == "repository cache unusable; rebuilding" for entry in logs)
    assert_same_weights(good, rebuilt)
    with structlog.testing.capture_logs() as logs:
        build_repository(SMALL, tmp_path)
    assert logs == []


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("EVOMERGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "evomerge-sdk"


def test_targets_and_their_examples(repo: Repository) -> None:
    targets = repo.targets()
    assert [t.kind for t in targets] == ["ood"] * SMALL.ood_targets + ["id"] * SMALL.id_targets
    assert len({t.task.domain for t in targets}) == len(targets)
    for t in targets:
        assert t.name == f"{t.kind}:{t.task.name}" and t.specialist == t.task.name
        sizes = (len(t.validation), len(t.holdout), len(t.test))
        assert sizes == (SMALL.validation_size, SMALL.holdout_size, SMALL.test_size)
        ids, _ = repo.encode(list(t.validation.prompts[:5]))
        np.testing.assert_array_equal(ids, t.validation.ids[:5])
        assert set(np.unique(t.test.labels)) <= set(t.test.answer_ids.tolist())
        labels = {repo.tokenizer.tokens[int(i)] for i in repo.world.label_ids}
        assert repo.tokenizer.tokens[int(t.test.labels[0])] in labels
        assert repo.target(t.name) is t


def test_adapters_learned_their_tasks(repo: Repository) -> None:
    for t in repo.targets():
        specialist = repo.evaluate(repo.single(t.specialist), t.test)
        base = repo.evaluate(repo.base, t.test)
        assert specialist.loss < base.loss - 0.3


def test_roles(repo: Repository) -> None:
    target = repo.target("ood:ner/news")
    assert repo.role("ner/news", target) == "specialist"
    expected = {"task": None, "harmful": "harmful", "irrelevant": "irrelevant"}
    for a in repo.adapters:
        role = repo.role(a.name, target)
        if a.kind != "task":
            assert role == expected[a.kind]
            continue
        same_type = a.task.type_name == "ner"
        same_domain = a.task.domain == "news"
        want = {(True, True): "specialist", (True, False): "same-type", (False, True): "same-domain"}
        assert role == want.get((same_type, same_domain), "other-task")
    assert {a.kind for a in repo.adapters} == {"task", "harmful", "irrelevant"}
    harmful = [a for a in repo.adapters if a.kind == "harmful"]
    assert len(harmful) == SMALL.harmful
    targets = {t.task.name for t in repo.targets()}
    for a in harmful:
        # named like the task it claims, trained on its inversion, never a target's own task
        assert a.task.inverted and a.name == f"{a.task.type_name}/{a.task.domain}" and a.name not in targets
    assert len(repo.adapters) == SMALL.n_types * SMALL.n_domains + SMALL.irrelevant


@pytest.mark.parametrize("size", [1, 5, 10, 13])
def test_pools(repo: Repository, size: int) -> None:
    for t in repo.targets():
        pool = repo.pool(t, size, seed=3)
        assert len(pool) == size == len(set(pool))
        assert set(pool) <= set(repo.adapter_names)
        assert (t.specialist in pool) == (t.kind == "id")
        assert pool == repo.pool(t.name, size, seed=3)
        if size >= 5:
            roles = {repo.role(n, t) for n in pool}
            assert {"same-domain", "same-type", "harmful"} <= roles


def test_pool_seeds_differ_and_bad_pools_are_refused(repo: Repository) -> None:
    t = repo.targets()[0]
    assert len({tuple(repo.pool(t, 5, seed=s)) for s in range(5)}) > 1
    largest = len(repo.adapters) - 1
    assert len(repo.pool(t, largest)) == largest
    for bad in (0, -1, largest + 1, True, 2.5):
        with pytest.raises(ConfigError):
            repo.pool(t, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown target"):
        repo.pool("ood:nope/none", 5)
    with pytest.raises(ConfigError, match="unknown adapter"):
        repo.adapter("nope")
    other = build_repository(RepositoryConfig.small(seed=2), use_cache=False)
    with pytest.raises(ConfigError, match="another repository"):
        repo.target(other.targets()[0])


def test_top_logprobs_and_prompt_errors(repo: Repository) -> None:
    t = repo.targets()[0]
    top = repo.top_logprobs(repo.single(t.specialist), t.test.prompts[0], k=3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    assert all(token in repo.tokenizer for token, _ in top)
    with pytest.raises(ConfigError):
        repo.top_logprobs(repo.base, "ner: ?", k=0)
    with pytest.raises(ConfigError):
        repo.next_token_logprobs(repo.base, [""])
    with pytest.raises(ConfigError):
        repo.next_token_logprobs(repo.base, "ner: ?")  # a str, not a list of prompts


def test_examples_from_text_score_like_the_targets(repo: Repository) -> None:
    t = repo.targets()[0]
    words = [repo.tokenizer.tokens[int(i)] for i in t.validation.labels[:20]]
    rebuilt = repo.examples(list(t.validation.prompts[:20]), words)
    weights = repo.single(t.specialist)
    assert repo.evaluate(weights, rebuilt) == repo.evaluate(weights, t.validation.subset(slice(0, 20)))
    ids, lengths = repo.encode(list(t.validation.prompts[:3]))
    np.testing.assert_array_equal(
        repo.next_token_logprobs_ids(weights, ids, lengths),
        repo.next_token_logprobs(weights, list(t.validation.prompts[:3])),
    )
    scores = repo.answer_logprobs(weights, rebuilt)
    assert scores.shape == (20, len(repo.world.label_ids))
    accuracy = np.mean(rebuilt.answer_ids[np.argmax(scores, axis=1)] == rebuilt.labels)
    assert accuracy == repo.evaluate(weights, rebuilt).accuracy
    with pytest.raises(ConfigError, match="one answer per prompt"):
        repo.examples(["ner: ?"], [])
    with pytest.raises(ConfigError, match="unknown token"):
        repo.examples(["ner: ?"], ["no-such-label"])
    with pytest.raises(ConfigError, match="answer set"):
        repo.examples(["ner: ?"], [words[0]], answer_set=[w for w in ("red", "green") if w != words[0]][:1])


def test_distinct_worlds_start_every_adapter_from_its_own_a() -> None:
    """Shared-A adapters stay close to the one initialisation; distinct-A adapters are unrelated draws."""

    def mean_cosine(r: Repository) -> float:
        names = [a.name for a in r.adapters if a.kind == "task"]
        rows = np.stack([r.lora(n).a[1].ravel() for n in names])
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        sims = rows @ rows.T
        return float(sims[np.triu_indices(len(names), 1)].mean())

    distinct = build_repository(attrs.evolve(SMALL, lora_init="distinct"), use_cache=False)
    assert mean_cosine(build_repository(SMALL, use_cache=False)) > 0.7
    assert abs(mean_cosine(distinct)) < 0.2
    assert distinct.config.key() != SMALL.key()


@pytest.mark.parametrize(
    "changes",
    [
        {"harmful": -1},
        {"rank": 0},
        {"train_sizes": ()},
        {"train_sizes": (0,)},
        {"temperature": float("nan")},
        {"ood_targets": 0, "id_targets": 0},
        {"ood_targets": 3, "id_targets": 2},  # more targets than the 4 domains
        {"general_per_prompt": 99},
        {"seed": "0"},
        {"n_types": 2.5},
        {"train_lr": float("inf")},
        {"lora_init": "random"},
    ],
)
def test_bad_configs_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        attrs.evolve(SMALL, **changes)


def test_default_repository_builds_and_loads_from_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default cache directory, as the SDK uses it: the build is paid once per machine.
    built = build_repository()
    assert (default_cache_dir() / f"repository-{RepositoryConfig().key()[:24]}.npz").exists()

    def no_training(*args: object) -> None:
        raise AssertionError("a cached repository must not train")

    monkeypatch.setattr(repository_module, "_train", no_training)
    loaded = build_repository()
    assert len(loaded.adapters) == 110 and len(loaded.targets()) == 8
    assert sum(a.kind == "harmful" for a in loaded.adapters) == 10
    assert_same_weights(built, loaded)
    for t in (loaded.targets()[0], loaded.targets()[-1]):
        for size in (5, 20, 100):
            pool = loaded.pool(t, size, seed=0)
            assert (t.specialist in pool) == (t.kind == "id")
        merger = loaded.merger(pool)
        metrics = loaded.evaluate(merger.merge(np.ones(100), np.full(100, 0.01)), t.validation)
        assert np.isfinite(metrics.loss) and metrics.n == 300
