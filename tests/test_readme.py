"""The README's commands are the ones CI runs, so the README stays true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_ci_runs_the_readme_test_command() -> None:
    commands = _readme_commands()
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_readme_opens_with_the_two_commands() -> None:
    commands = _readme_commands()
    assert len(commands) >= 2
    assert "pip install" in commands[0] and "pip install" in commands[1]


def test_readme_python_examples_compile() -> None:
    blocks = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        # Snippets may await at top level, as in an async REPL (`python -m asyncio`).
        compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    sources = [*(ROOT / "evomerge_sdk").rglob("*.py"), *(ROOT / "adapters").rglob("*.py")]
    read = set()
    for path in sources:
        text = path.read_text(encoding="utf-8")
        read |= set(re.findall(r'(?:environ\.get\(|environ\[|getenv\(|_env\()\s*"([A-Z][A-Z0-9_]+)"', text))
        read |= set(re.findall(r'"([A-Z][A-Z0-9_]+)" in os\.environ', text))
        read |= set(re.findall(r'_setting\([^)]*"([A-Z][A-Z0-9_]+)"\)', text))
        read |= set(re.findall(r'^[A-Z_]*_ENV\s*=\s*"([A-Z][A-Z0-9_]+)"', text, flags=re.M))
    assert {"EVOMERGE_API_KEY", "EVOMERGE_CACHE_DIR", "EVOMERGE_BLAS_THREADS", "OPENAI_API_KEY"} <= read
    table = (ROOT / "README.md").read_text(encoding="utf-8").split("| environment variable |")[1]
    missing = sorted(v for v in read if f"`{v}`" not in table)
    assert not missing, f"README's environment table lacks {missing}"
