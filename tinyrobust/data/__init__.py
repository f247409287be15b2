"""Datasets as `tf.data.Dataset`s of `(x, y)` with inputs scaled to [0, 1].

`load(name, split, batch_size)` is the one entry point; `info(name)` describes
a dataset. Splits are "train", "validation" (a seeded, fixed hold-out of the
training data) and "test".
"""

import dataclasses

import numpy as np
import tensorflow as tf

from tinyrobust.data import fashion_mnist
from tinyrobust.validation import check_choice

__all__ = ["DatasetInfo", "info", "load", "load_arrays", "calibration_set", "NAMES"]

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: registry name.
        input_shape: shape of one input.
        num_classes: number of labels.
        input_range: (low, high) of the inputs.
        class_names: label names.
    """

    name: str
    input_shape: tuple
    num_classes: int
    input_range: tuple = (0.0, 1.0)
    class_names: tuple = ()


_INFO = {
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", (28, 28, 1), 10,
        class_names=("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                     "ankle-boot"),
    ),
}

NAMES = tuple(sorted(_INFO))


def info(name):
    """Returns the `DatasetInfo` of `name`.

    Raises:
        ValueError: unknown name.
    """
    if name not in _INFO:
        raise ValueError(f"Unknown dataset. Expected one of {list(NAMES)}. Received: name={name!r}")
    return _INFO[name]


def _validation_indices(n, fraction, seed):
    order = np.random.default_rng(seed).permutation(n)
    return order[: int(round(n * fraction))], order[int(round(n * fraction)):]


def load_arrays(name, split, validation_fraction=0.1, limit=None, seed=0):
    """Loads a split as numpy arrays `(x, y)`, x float32 in the input range.

    Args:
        name: dataset name (see `NAMES`).
        split: "train", "validation" or "test".
        validation_fraction: fraction of the training data held out as
            "validation" (fixed by `seed`, disjoint from "train").
        limit: keep the first `limit` examples (after the split), or None.
        seed: seed of the train/validation partition.

    Returns:
        `(x, y)` with x of shape (N, *input_shape) and y int32 labels.
    """
    dataset_info = info(name)
    check_choice("split", split, SPLITS)
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(
            f"Expected `validation_fraction` in [0, 1). Received: validation_fraction={validation_fraction!r}"
        )
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"Expected `limit` to be a positive integer or None. Received: limit={limit!r}")
    images, labels = fashion_mnist.read("test" if split == "test" else "train")
    if split != "test":
        held_out, kept = _validation_indices(len(labels), validation_fraction, seed)
        index = np.sort(held_out if split == "validation" else kept)
        images, labels = images[index], labels[index]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = images.reshape((-1, *dataset_info.input_shape)).astype("float32") / 255.0
    return x, labels.astype("int32")


def load(name, split, batch_size=32, shuffle=None, seed=0, validation_fraction=0.1, limit=None, cache=True,
         drop_remainder=False):
    """Loads a split as a batched `tf.data.Dataset` of `(x, y)`.

    Args:
        name: dataset name (see `NAMES`).
        split: "train", "validation" or "test".
        batch_size: examples per batch.
        shuffle: shuffle every epoch with `seed`; defaults to True for "train".
        seed: seed of the shuffling and of the train/validation partition.
        validation_fraction: fraction of the training data held out.
        limit: keep the first `limit` examples, or None.
        cache: cache the decoded examples in memory.
        drop_remainder: drop the last incomplete batch.

    Returns:
        A `tf.data.Dataset` yielding `(x, y)` batches, prefetched.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"Expected `batch_size` to be a positive integer. Received: batch_size={batch_size!r}")
    x, y = load_arrays(name, split, validation_fraction=validation_fraction, limit=limit, seed=seed)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if cache:
        dataset = dataset.cache()
    if split == "train" if shuffle is None else shuffle:
        dataset = dataset.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def calibration_set(name, size=200, seed=0):
    """A representative set for int8 calibration, drawn from the train split.

    Args:
        name: dataset name.
        size: number of examples.
        seed: seed of the draw.

    Returns:
        `(x, indices)`: the inputs and their indices within the "train" split.
    """
    x, _ = load_arrays(name, "train", seed=seed)
    if not isinstance(size, int) or not 0 < size <= len(x):
        raise ValueError(f"Expected `size` in [1, {len(x)}]. Received: size={size!r}")
    indices = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    return x[indices], indices
