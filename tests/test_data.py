import numpy as np
import pytest

from tinyrobust import data
from tinyrobust.data import fashion_mnist


def test_fashion_mnist_arrays():
    x, y = data.load_arrays("fashion_mnist", "test")
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))


def test_train_validation_disjoint_and_deterministic():
    train, _ = data.load_arrays("fashion_mnist", "train", seed=3)
    validation, _ = data.load_arrays("fashion_mnist", "validation", seed=3)
    assert len(train) + len(validation) == 60000 and len(validation) == 6000
    again, _ = data.load_arrays("fashion_mnist", "validation", seed=3)
    np.testing.assert_array_equal(validation, again)
    other, _ = data.load_arrays("fashion_mnist", "validation", seed=4)
    assert not np.array_equal(validation, other)


def test_dataset_batches_and_seeded_shuffle():
    first = [y.numpy() for _, y in data.load("fashion_mnist", "train", batch_size=50, limit=200, seed=1)]
    second = [y.numpy() for _, y in data.load("fashion_mnist", "train", batch_size=50, limit=200, seed=1)]
    assert [len(b) for b in first] == [50] * 4
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))


def test_calibration_set_from_train_split():
    x, indices = data.calibration_set("fashion_mnist", size=20, seed=2)
    train, _ = data.load_arrays("fashion_mnist", "train", seed=2)
    np.testing.assert_array_equal(x, train[indices])


def test_missing_files_say_where_we_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "search_paths", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fashion_mnist.read("train", allow_download=False)


def test_tinyrobust_data_env_is_searched(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYROBUST_DATA", str(tmp_path))
    assert fashion_mnist.search_paths()[0] == tmp_path / "fashion-mnist"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: data.info("mnist"), "Received: name='mnist'"),
        (lambda: data.load_arrays("fashion_mnist", "dev"), "Received: split='dev'"),
        (lambda: data.load("fashion_mnist", "train", batch_size=0), "Received: batch_size=0"),
        (lambda: data.load_arrays("fashion_mnist", "train", limit=-5), "Received: limit=-5"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
