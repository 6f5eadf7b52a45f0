"""The package root: every exported name resolves, and importing it stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import evomerge_sdk


def test_every_exported_name_resolves() -> None:
    for name in evomerge_sdk.__all__:
        assert getattr(evomerge_sdk, name) is not None, name


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        evomerge_sdk.no_such_thing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_import_loads_no_heavy_module() -> None:
    # Import time is measured in benchmarks/scheduler.py; here we pin *why* it is fast.
    code = "import sys, json, evomerge_sdk; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert not loaded & {"numpy", "aiohttp", "tiktoken", "structlog", "anyio"}


def test_timeout_is_a_deprecated_alias_of_request_timeout() -> None:
    import warnings

    from evomerge_sdk import errors

    for module in (evomerge_sdk, errors):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = module.Timeout  # type: ignore[attr-defined]
        assert old is evomerge_sdk.RequestTimeout
        assert [w.category for w in caught] == [DeprecationWarning]
        assert "RequestTimeout" in str(caught[0].message)
    assert "Timeout" not in evomerge_sdk.__all__ and "Timeout" not in errors.__all__


def test_misuse_is_a_usage_error_not_a_config_error() -> None:
    import numpy as np
    import pytest

    from evomerge_sdk.engine import CMA

    assert issubclass(evomerge_sdk.UsageError, evomerge_sdk.EvomergeError)
    assert not issubclass(evomerge_sdk.UsageError, evomerge_sdk.ConfigError)
    with pytest.raises(evomerge_sdk.UsageError, match="ask"):
        CMA(np.zeros(2), 0.3, seed=0).tell(np.zeros(4))
