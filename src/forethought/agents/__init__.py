"""Agents: the loops of the course notes, one module each.

Each module has a `Config` dataclass, a result type and `train(config, env, key, run=None)`.
`AGENTS` maps the CLI name to `(module, config class)`: one module may serve several names with
different defaults (`mpc` and `pets`). `load(name)` gives the module, `config_class(name)` the
config.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from forethought.errors import ForethoughtError

AGENTS: dict[str, tuple[str, str]] = {
    "random": ("forethought.agents.random_policy", "Config"),
    "mpc": ("forethought.agents.mpc", "NaiveConfig"),
    "pets": ("forethought.agents.mpc", "PETSConfig"),
    "dyna-q": ("forethought.agents.dyna_q", "Config"),
    "dyna-q-plus": ("forethought.agents.dyna_q", "PlusConfig"),
    "sac": ("forethought.agents.sac", "Config"),
    "mbpo": ("forethought.agents.mbpo", "Config"),
    "mve": ("forethought.agents.mve", "Config"),
    "svg": ("forethought.agents.svg", "Config"),
    "bptt": ("forethought.agents.bptt", "Config"),
    "pilco": ("forethought.agents.pilco", "Config"),
    "ppo-model": ("forethought.agents.ppo_model", "Config"),
    "lqr-flm": ("forethought.agents.lqr_flm", "Config"),
    "gps": ("forethought.agents.gps", "Config"),
    "distill": ("forethought.agents.distill", "Config"),
    "latent-mpc": ("forethought.agents.latent_mpc", "Config"),
}


def names() -> list[str]:
    return sorted(AGENTS)


def load(name: str) -> ModuleType:
    """The agent module behind `name` (it has `Config` and `train`)."""
    if name not in AGENTS:
        raise ForethoughtError(f"unknown agent {name!r}; expected one of: {', '.join(names())}")
    return importlib.import_module(AGENTS[name][0])


def config_class(name: str) -> type:
    """The `Config` dataclass of agent `name` (its CLI flags)."""
    return getattr(load(name), AGENTS[name][1])


def summary(name: str) -> str:
    """The first line of the agent's config docstring."""
    doc = config_class(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
