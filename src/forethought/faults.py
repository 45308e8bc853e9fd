"""Numerical faults: NaN or inf from a model, a critic, a Cholesky factor or a planner.

Components detect their own faults (a jitted update checks its new parameters with `all_finite`
and keeps the old ones with `keep_finite`; a fit checks its loss each epoch) and call
`report(component, step, detail)`. What happens then is the run's policy, set with `handling`:

- `"stop"` (the default): `report` raises `NumericalFault`, naming the component and the step.
  The CLI records it in `events.jsonl`, prints one line and exits with status 3; the run folder
  keeps its last good checkpoint, so `--resume` continues from there.
- `"skip"`: `report` records a `numerical_fault` event and returns; the component has already
  thrown the bad update away and goes on with its last good parameters.

Either way a NaN never reaches a checkpoint: `Run.save_checkpoint` refuses a state that holds one
(`nan_leaves` names them).

    with faults.handling("skip", record=run.event):
        agent.train(config, env, key, run)
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from forethought.errors import ForethoughtError, check_choice

POLICIES = ("stop", "skip")


class NumericalFault(ForethoughtError):
    """A computation produced NaN or inf; `component` and `step` say where."""

    def __init__(self, component: str, step: Any, detail: str):
        self.component, self.step, self.detail = component, step, detail
        super().__init__(f"numerical fault in {component} at {step}: {detail}")


_policy: contextvars.ContextVar[tuple[str, Callable[..., None] | None]] = contextvars.ContextVar(
    "forethought_fault_policy", default=("stop", None))


@contextlib.contextmanager
def handling(policy: str, record: Callable[..., None] | None = None) -> Iterator[None]:
    """Within this block, faults are handled by `policy` ("stop" or "skip"); `record(kind, **data)`
    (a run's `event`) receives every fault that is skipped."""
    check_choice(policy, "on_fault policy", POLICIES)
    token = _policy.set((policy, record))
    try:
        yield
    finally:
        _policy.reset(token)


def policy() -> str:
    """The policy in force: "stop" unless inside `handling("skip")`."""
    return _policy.get()[0]


def report(component: str, step: Any, detail: str) -> None:
    """Report a fault: raise `NumericalFault` under "stop"; record it and return under "skip"."""
    name, record = _policy.get()
    fault = NumericalFault(component, step, detail)
    if name == "stop":
        raise fault
    if record is not None:
        record("numerical_fault", component=component, step=step, detail=detail, handled="skipped")
    warnings.warn(f"{fault} (on_fault=skip: going on with the last good values)", RuntimeWarning,
                  stacklevel=2)


def all_finite(tree: Any) -> jax.Array:
    """True when every floating leaf of `tree` is free of NaN and inf (jittable)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
              if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def keep_finite(new: Any, old: Any, ok: jax.Array | None = None) -> tuple[Any, jax.Array]:
    """`(new, True)` if `new` (and `ok`, when given) is all finite, else `(old, False)` (jittable;
    `new` and `old` share one structure)."""
    ok = all_finite(new) if ok is None else ok & all_finite(new)
    chosen = jax.tree.map(lambda n, o: jnp.where(ok, n, o) if hasattr(n, "dtype") else n, new, old)
    return chosen, ok


def nan_leaves(tree: Any, limit: int = 5) -> list[str]:
    """Paths of the leaves of `tree` that hold NaN (concrete values only), the first `limit`."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "dtype"):
            continue
        dtype = np.dtype(leaf.dtype) if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else None
        if dtype is not None and np.issubdtype(dtype, np.inexact) and np.isnan(np.asarray(leaf)).any():
            bad.append(jax.tree_util.keystr(path) or "<root>")
            if len(bad) >= limit:
                break
    return bad
