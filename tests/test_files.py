import json
import os

import numpy as np
import pytest

from tinyrobust import files


def test_write_atomically_writes_bytes_and_text_and_creates_folders(tmp_path):
    path = files.write_atomically(tmp_path / "a" / "b" / "x.bin", b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    files.write_atomically(path, "é\n")
    assert path.read_text(encoding="utf-8") == "é\n"
    assert sorted(os.listdir(path.parent)) == ["x.bin"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_atomically_rejects_other_data(tmp_path):
    with pytest.raises(TypeError, match="Received: data of type dict"):
        files.write_atomically(tmp_path / "x.json", {"a": 1})
    assert not list(tmp_path.iterdir())


def test_write_json_ends_with_a_newline_and_passes_options(tmp_path):
    path = files.write_json(tmp_path / "r.json", {"b": 1, "a": 2}, sort_keys=True)
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    files.write_json(path, {"t": object}, indent=None, default=lambda v: "x")
    assert path.read_text() == '{"t": "x"}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = files.write_json(tmp_path / "state.json", {"epoch": 3})

    with pytest.raises(RuntimeError, match="killed"):
        with files.atomic_path(path) as partial:
            partial.write_text('{"epo')  # half written
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"epoch": 3}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]

    with pytest.raises(ValueError):  # json.dumps fails before anything is written
        files.write_json(path, {"x": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text()) == {"epoch": 3}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_atomic_path_keeps_the_suffix_for_writers_that_need_it(tmp_path):
    target = tmp_path / "weights.npz"
    with files.atomic_path(target) as partial:
        assert partial.suffix == ".npz" and partial.parent == tmp_path and partial != target
        np.savez(partial, w=np.arange(3))  # would append ".npz" to a name without it
    assert sorted(os.listdir(tmp_path)) == ["weights.npz"]
    np.testing.assert_array_equal(np.load(target)["w"], np.arange(3))


def test_atomic_path_saves_a_keras_model(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with files.atomic_path(tmp_path / "m.keras") as partial:
        model.save(partial)
    restored = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(restored.get_weights()[0], model.get_weights()[0])
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]


def test_a_folder_lock_is_exclusive_and_released_with_its_holder(tmp_path):
    from tinyrobust import files

    with files.folder_lock(tmp_path):
        with pytest.raises(ValueError, match=r"Another run \(process \d+\) is writing into"):
            with files.folder_lock(tmp_path):
                pass
    with files.folder_lock(tmp_path):  # released at the end of the block
        pass
