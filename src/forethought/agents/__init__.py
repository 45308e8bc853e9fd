"""Agents: the loops of the course notes, one module each.

Each module has a `Config` dataclass, a result type and `train(config, env, key, run=None)`.
`AGENTS` maps the CLI name to the module; `load(name)` imports it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from forethought.errors import ForethoughtError

AGENTS: dict[str, str] = {
    "random": "forethought.agents.random_policy",
}


def names() -> list[str]:
    return sorted(AGENTS)


def load(name: str) -> ModuleType:
    """The agent module behind `name` (it has `Config` and `train`)."""
    if name not in AGENTS:
        raise ForethoughtError(f"unknown agent {name!r}; expected one of: {', '.join(names())}")
    return importlib.import_module(AGENTS[name])


def summary(name: str) -> str:
    """The first line of the agent's docstring."""
    doc = load(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
