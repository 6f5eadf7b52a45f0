"""`evomerge-peft`: serve PEFT LoRA pools as a merge service, or build the real-format world.

    evomerge-peft serve --base DIR --pool NAME=DIR [--pool NAME=DIR ...] [--data NAME=FILE ...] [--port N]
    evomerge-peft world --out DIR [--seed S] [--variant own_seed|shared_seed]

`--pool NAME=DIR` adds to pool NAME either the adapter folder DIR (it holds adapter_config.json) or every
sub-folder of DIR (each must be an adapter folder; the sub-folder's name is the adapter's name). `--data
NAME=FILE` offers a JSONL file of {"prompt", "completion"} or {"messages"} lines as dataset NAME to every
pool. Bad arguments exit with status 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from evomerge_sdk.errors import ConfigError

__all__ = ["main"]


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} takes NAME=PATH, got {value!r}")
        out.append((name, path))
    return out


def pool_folders(values: list[str]) -> dict[str, dict[str, Path]]:
    """The pools of `--pool NAME=DIR` arguments: {pool: {adapter: folder}}."""
    pools: dict[str, dict[str, Path]] = {}
    for name, path in _pairs(values, "--pool"):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--pool {name}={path}: {path!r} is not a local folder")
        if (folder / "adapter_config.json").exists():
            found = {folder.name: folder}
        else:
            found = {
                sub.name: sub
                for sub in sorted(folder.iterdir())
                if sub.is_dir() and not sub.name.startswith(".")
            }
        if not found:
            raise ConfigError(f"--pool {name}={path}: the folder holds no adapter folders")
        pool = pools.setdefault(name, {})
        for adapter, sub in found.items():
            if adapter in pool:
                raise ConfigError(f"--pool {name}: two adapters are named {adapter!r}")
            pool[adapter] = sub
    return pools


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge-peft", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve pools of PEFT LoRA adapters as a merge service")
    serve.add_argument("--base", required=True, help="the base model's local folder")
    serve.add_argument("--pool", action="append", required=True, help="NAME=DIR (repeatable)")
    serve.add_argument("--data", action="append", default=[], help="NAME=FILE.jsonl (repeatable)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", default=os.environ.get("EVOMERGE_API_KEY"))
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--merge-form", default="paper", choices=["paper", "cat"])
    serve.add_argument("--batch-size", type=int, default=32)
    serve.add_argument("--max-sessions", type=int, default=64)
    serve.add_argument("--output-dir", default=None, help="where materialised adapters go")
    world = sub.add_parser("world", help="build the tiny real-format world (base, adapters, data)")
    world.add_argument("--out", required=True)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--variant", default="own_seed", choices=["own_seed", "shared_seed"])
    return parser


async def _serve(args: argparse.Namespace) -> None:
    from evomerge_sdk.local.server import LocalService, serve

    from ._backend import PeftBackend
    from ._pool import load_base

    base = load_base(args.base, device=args.device, dtype=args.dtype)
    datasets = dict(_pairs(args.data, "--data"))
    backend = PeftBackend(
        base, pool_folders(args.pool), datasets, merge_form=args.merge_form, batch_size=args.batch_size
    )
    service = LocalService(
        backend=backend, host=args.host, port=args.port, api_key=args.api_key,
        max_sessions=args.max_sessions, output_dir=args.output_dir, workers=4,
    )  # fmt: skip

    def announce(info: dict[str, Any]) -> None:
        print(json.dumps({**info, "backend": "peft", "base": str(base.path)}), flush=True)

    await serve(service, announce=announce)


def main(argv: list[str] | None = None) -> int:
    """Run the command; 2 with a message naming the problem for bad arguments."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only, whatever the libraries try
    try:
        if args.command == "world":
            from ._world import WorldConfig, build_world

            world = build_world(WorldConfig(seed=args.seed), root=args.out, variant=args.variant)
            adapters = {k: str(v) for k, v in world.adapters.items()}
            info = {"root": str(world.root), "base": str(world.base), "targets": list(world.targets)}
            print(json.dumps({**info, "adapters": adapters}))
            return 0
        import anyio

        anyio.run(_serve, args)
    except ConfigError as exc:
        print(f"evomerge-peft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
