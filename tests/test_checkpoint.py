import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forethought import _io
from forethought.errors import ForethoughtError
from forethought import checkpoint


def test_round_trip_of_an_equinox_module_with_a_key(tmp_path):
    model = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(0))
    state = {"model": model, "key": jax.random.key(5), "step": np.int64(7)}
    checkpoint.save(tmp_path / "c.npz", state, {"episode": 3})
    like = {"model": eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(1)), "key": jax.random.key(0),
            "step": np.int64(0)}
    restored, meta = checkpoint.load(tmp_path / "c.npz", like)
    assert meta == {"episode": 3}
    x = jnp.ones(3)
    np.testing.assert_array_equal(restored["model"](x), model(x))
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))
    assert restored["step"] == 7


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"a": np.ones(3)}, {"n": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_io.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"a": np.zeros(3)}, {"n": 2})
    _, meta = checkpoint.load(path, {"a": np.ones(3)})
    assert meta == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left behind


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_corrupt_files_are_refused_with_the_file_name(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(ForethoughtError, match="bad.npz"):
        checkpoint.load(path, {"a": np.ones(3)})


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"a": np.arange(1000.0)}, {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ForethoughtError, match="corrupt"):
        checkpoint.load(path, {"a": np.arange(1000.0)})


def test_pickled_object_arrays_are_never_loaded(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"0": np.array([{"x": 1}], dtype=object), "__meta__": np.frombuffer(b"{}", np.uint8)})
    with pytest.raises(ForethoughtError, match="evil.npz"):
        checkpoint.load(path, {"a": np.ones(1)})


def test_a_checkpoint_of_another_structure_is_refused(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"a": np.ones(3)}, {})
    with pytest.raises(ForethoughtError, match="shape"):
        checkpoint.load(path, {"a": np.ones(4)})
    with pytest.raises(ForethoughtError, match="arrays, expected"):
        checkpoint.load(path, {"a": np.ones(3), "b": np.ones(1)})
