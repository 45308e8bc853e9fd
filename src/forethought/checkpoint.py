"""Checkpoints without pickle: one `.npz` of arrays plus JSON metadata, written atomically.

`save(path, tree, meta)` flattens any pytree (Equinox modules, optimizer states, typed PRNG keys)
into its array leaves; `load(path, like)` refills a template pytree of the same structure, so
loading executes no code from the file. A write goes to a temporary file in the same folder and is
renamed over the old one, so a kill mid-write leaves the previous checkpoint intact. A state
holding NaN is refused (`forethought.faults.NumericalFault`) and the previous checkpoint stays:
a NaN is never saved to be resumed from. Infinities are allowed ("none yet" markers such as a
best cost so far).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from forethought._io import atomic_write_bytes
from forethought.errors import ForethoughtError
from forethought.faults import NumericalFault, nan_leaves

_META = "__meta__"
_KEY_PREFIX = "key:"  # leaves that were typed PRNG keys, stored as their raw key data


def _is_array(leaf: Any) -> bool:
    """Arrays are saved; other leaves (activation functions, Python settings) come from `like`."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def save(path: Path, tree: Any, meta: dict | None = None) -> None:
    """Save the array leaves of `tree` and JSON-able `meta` to `path` (an `.npz`)."""
    import io

    if bad := nan_leaves(tree):
        raise NumericalFault("checkpoint", str(path), f"the state holds NaN in {', '.join(bad)}; "
                             "not written (the previous checkpoint is kept)")
    arrays = {}
    for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
        if not _is_array(leaf):
            continue
        if _is_key(leaf):
            arrays[f"{_KEY_PREFIX}{i}"] = np.asarray(jax.random.key_data(leaf))
        else:
            arrays[str(i)] = np.asarray(leaf)
    arrays[_META] = np.frombuffer(json.dumps(meta or {}).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_meta(path: Path) -> dict:
    """Only the metadata of a checkpoint."""
    return _open(path)[1]


def _open(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(arrays.pop(_META).tobytes().decode())
    except FileNotFoundError:
        raise ForethoughtError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise ForethoughtError(f"checkpoint {path} is corrupt or not a forethought checkpoint "
                               f"({type(error).__name__}: {error})") from None
    if not isinstance(meta, dict):
        raise ForethoughtError(f"checkpoint {path} is corrupt: its metadata is not a JSON object")
    return arrays, meta


def load(path: Path, like: Any) -> tuple[Any, dict]:
    """Load a checkpoint into the structure of `like`; returns `(tree, meta)`.

    Raises `ForethoughtError` naming the file if it is missing, corrupt, or does not match `like`.
    """
    arrays, meta = _open(path)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    expected_count = sum(map(_is_array, leaves))
    if len(arrays) != expected_count:
        raise ForethoughtError(f"checkpoint {path} holds {len(arrays)} arrays, expected {expected_count}")
    restored = []
    for i, template in enumerate(leaves):
        if not _is_array(template):
            restored.append(template)
            continue
        if _is_key(template):
            name = f"{_KEY_PREFIX}{i}"
            if name not in arrays:
                raise ForethoughtError(f"checkpoint {path}: leaf {i} should be a PRNG key")
            restored.append(jax.random.wrap_key_data(arrays[name], impl=jax.random.key_impl(template)))
            continue
        if str(i) not in arrays:
            raise ForethoughtError(f"checkpoint {path}: leaf {i} is missing")
        value = arrays[str(i)]
        expected = np.shape(template)
        if value.shape != expected:
            raise ForethoughtError(f"checkpoint {path}: leaf {i} has shape {value.shape}, expected {expected}")
        if value.dtype != np.dtype(template.dtype):
            raise ForethoughtError(f"checkpoint {path}: leaf {i} has dtype {value.dtype}, "
                                   f"expected {np.dtype(template.dtype)}")
        if isinstance(template, jax.Array):
            restored.append(jax.numpy.asarray(value))
        elif isinstance(template, np.generic):
            restored.append(value[()])
        else:
            restored.append(value)
    return jax.tree_util.tree_unflatten(treedef, restored), meta
