"""Fashion-MNIST from local files: no network needed when a copy exists."""

import gzip
import os
import pathlib

import numpy as np

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"


def search_paths():
    """Folders searched for the four Fashion-MNIST `.gz` files, in order."""
    paths = []
    if os.environ.get("TINYROBUST_DATA"):
        root = pathlib.Path(os.environ["TINYROBUST_DATA"])
        paths += [root / "fashion-mnist", root / "fashion_mnist", root]
    paths.append(pathlib.Path("/usr/share/datasets/fashion-mnist"))  # Debian: dataset-fashion-mnist
    keras_home = pathlib.Path(os.environ.get("KERAS_HOME", pathlib.Path.home() / ".keras"))
    paths.append(keras_home / "datasets" / "fashion-mnist")
    tfds_home = pathlib.Path(os.environ.get("TFDS_DATA_DIR", pathlib.Path.home() / "tensorflow_datasets"))
    paths.append(tfds_home / "downloads" / "manual" / "fashion_mnist")
    return paths


def _find():
    for folder in search_paths():
        if all((folder / name).is_file() for pair in _FILES.values() for name in pair):
            return folder
    return None


def _download():
    """Fetches the files into the Keras cache (only when no local copy exists)."""
    import keras

    folder = None
    for pair in _FILES.values():
        for name in pair:
            path = keras.utils.get_file(name, origin=_URL + name, cache_subdir="datasets/fashion-mnist")
            folder = pathlib.Path(path).parent
    return folder


def _read_idx(path, offset):
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=offset)


def read(split, allow_download=True):
    """Reads one split as uint8 arrays.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        allow_download: fetch into the Keras cache when no local copy exists.

    Returns:
        `(images, labels)`: uint8 arrays of shape (N, 28, 28) and (N,).

    Raises:
        FileNotFoundError: no local copy and the download failed or was not
            allowed; the message lists every folder searched.
    """
    folder = _find()
    if folder is None and allow_download:
        try:
            folder = _download()
        except Exception as error:  # noqa: BLE001 - any network failure ends the same way
            reason = f" The download failed: {error}."
        else:
            reason = ""
    else:
        reason = " Download not allowed."
    if folder is None:
        looked = "\n  ".join(str(p) for p in search_paths())
        raise FileNotFoundError(
            "Fashion-MNIST not found. Looked in:\n  " + looked + "\n" + reason.strip() + "\n"
            "Install Debian's `dataset-fashion-mnist` or put the four .gz files in $TINYROBUST_DATA."
        )
    images_name, labels_name = _FILES[split]
    images = _read_idx(folder / images_name, 16).reshape(-1, 28, 28)
    labels = _read_idx(folder / labels_name, 8)
    return images, labels
