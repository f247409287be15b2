"""Datasets as `tf.data.Dataset`s of `(x, y)`.

`load(name, split, batch_size)` is the one entry point; `info(name)` describes
a dataset (input shape, classes, input range). Image inputs are scaled to
[0, 1]; keyword-spotting inputs are the MLPerf Tiny MFCCs (49x10x1), whose
range `info(name).input_range` bounds. Splits are "train", "validation" and
"test"; "validation" is the data set's own validation split where it has one
(Speech Commands), else a seeded, fixed hold-out of the training data.

Names: `fashion_mnist` (local files, offline), `cifar10`, `svhn`
(tfds `svhn_cropped`), `speech_commands` (tfds, 12 classes),
`synthetic_kws` (spoken keywords synthesised offline with espeak-ng and flite).
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tinyrobust import seeding
from tinyrobust.data import audio, fashion_mnist, synthetic_kws, tfds_sets
from tinyrobust.validation import check_choice, check_number

__all__ = ["DatasetInfo", "digest", "info", "load", "load_arrays", "load_data", "calibration_set", "NAMES"]

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
        kind: "image" or "audio".
        flip: whether horizontal flips are a valid augmentation.
        native_validation: the data set has its own validation split.
    """

    name: str
    input_shape: tuple
    num_classes: int
    input_range: tuple = (0.0, 1.0)
    class_names: tuple = ()
    kind: str = "image"
    flip: bool = False
    native_validation: bool = False


_KWS_RANGE = (-float(audio.MFCC_BOUND), float(audio.MFCC_BOUND))
_INFO = {
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", (28, 28, 1), 10,
        class_names=("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                     "ankle-boot"),
    ),
    "cifar10": DatasetInfo(
        "cifar10", (32, 32, 3), 10, flip=True,
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    "svhn": DatasetInfo("svhn", (32, 32, 3), 10, class_names=tuple(str(d) for d in range(10))),
    "speech_commands": DatasetInfo(
        "speech_commands", (audio.FRAMES, audio.NUM_MFCC, 1), 12, _KWS_RANGE, audio.LABELS, kind="audio",
        native_validation=True,
    ),
    "synthetic_kws": DatasetInfo(
        "synthetic_kws", (audio.FRAMES, audio.NUM_MFCC, 1), 12, _KWS_RANGE, audio.LABELS, kind="audio",
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


_DIGESTS = {}


def digest(name):
    """The SHA-256 (16 hex digits) of a data set's stored contents: its training and test inputs and labels.

    A fingerprint that holds it tells a data set whose files changed under the same name (new keyword
    recordings, another copy of the images) from the one a result was measured on. Computed once per process.
    """
    info(name)
    if name not in _DIGESTS:
        import hashlib

        hasher = hashlib.sha256()
        splits = ("train", "validation", "test") if info(name).native_validation else ("train", "test")
        for split in splits:
            raw, labels = _read_raw(name, split)
            for array in (np.ascontiguousarray(raw), np.ascontiguousarray(labels)):
                hasher.update(f"{split}:{array.dtype}:{array.shape}".encode())
                hasher.update(array.tobytes())
        _DIGESTS[name] = hasher.hexdigest()[:16]
    return _DIGESTS[name]


def _read_raw(name, split):
    """Undecoded inputs of a stored split: uint8 images or int16 clips, and int32 labels."""
    if name == "fashion_mnist":
        images, labels = fashion_mnist.read(split)
        return images[..., None], labels.astype(np.int32)
    if name == "cifar10":
        return tfds_sets.read_images("cifar10", split)
    if name == "svhn":
        return tfds_sets.read_images("svhn_cropped", split)
    if name == "speech_commands":
        return tfds_sets.read_speech_commands(split)
    return synthetic_kws.read(split)


def _validation_indices(n, fraction, seed):
    order = np.random.default_rng(seed).permutation(n)
    return order[: int(round(n * fraction))], order[int(round(n * fraction)):]


def load_raw(name, split, validation_fraction=0.1, limit=None, seed=0):
    """A split before feature extraction: uint8 images or int16 1 s clips, and labels.

    Args: as `load_arrays`.

    Returns:
        `(raw, y)`: uint8 (N, H, W, C) images or int16 (N, 16000) clips, and
        int32 labels.
    """
    dataset_info = info(name)
    check_choice("split", split, SPLITS)
    check_number("validation_fraction", validation_fraction, low=0.0, high=1.0, high_open=True)
    if limit is not None:
        check_number("limit", limit, low=1, integer=True)
    if dataset_info.native_validation or split == "test":
        raw, labels = _read_raw(name, split)
    else:
        raw, labels = _read_raw(name, "train")
        held_out, kept = _validation_indices(len(labels), validation_fraction, seed)
        index = np.sort(held_out if split == "validation" else kept)
        raw, labels = raw[index], labels[index]
    if limit is not None:
        if limit > len(labels):  # nothing is cut to fit silently
            carved = ("" if dataset_info.native_validation or split == "test" else
                      f" (the training data less the {validation_fraction:.0%} held out as 'validation')")
            raise ValueError(f"The {split!r} split of {name!r} holds {len(labels):,} examples{carved}. "
                             f"Received: limit={limit}")
        raw, labels = raw[:limit], labels[:limit]
    return raw, labels


def load_data(name, validation_fraction=0.0, seed=0):
    """`(x_train, y_train), (x_test, y_test)` as numpy arrays, in the layout of `keras.datasets` loaders.

    Inputs are float32 of the models' input shape (images scaled to [0, 1] with a channel axis, audio as MFCCs),
    labels int32 of shape (N,). By default the training arrays hold the whole training split; with
    `validation_fraction` a share of it is held out (fixed by `seed`) and left out here, as `load_arrays`
    holds it out (read it with `load_arrays(name, "validation", ...)`).

    Args:
        name: dataset name (see `NAMES`).
        validation_fraction: share of the training split to leave out, in [0, 1).
        seed: seed of that partition.

    Returns:
        `((x_train, y_train), (x_test, y_test))`.
    """
    return (load_arrays(name, "train", validation_fraction=validation_fraction, seed=seed),
            load_arrays(name, "test"))


def features(name, raw):
    """Model inputs from raw examples: images scaled to [0, 1], clips to MFCCs (tensors in, tensors out)."""
    if info(name).kind == "audio":
        return audio.mfcc(raw)
    return tf.cast(raw, tf.float32) / 255.0


def load_arrays(name, split, validation_fraction=0.1, limit=None, seed=0):
    """Loads a split as numpy arrays `(x, y)`.

    Args:
        name: dataset name (see `NAMES`).
        split: "train", "validation" or "test".
        validation_fraction: fraction of the training data held out as
            "validation" (fixed by `seed`, disjoint from "train": by default
            "train" holds 90% of the training data, e.g. 54,000 of
            Fashion-MNIST's 60,000); unused for data sets with their own
            validation split. `load_data` gives the whole training split.
        limit: keep the first `limit` examples (after the split), or None;
            a limit above the split's size is refused.
        seed: seed of the train/validation partition.

    Returns:
        `(x, y)` with x float32 of shape (N, *input_shape) within the input
        range and y int32 labels.
    """
    raw, labels = load_raw(name, split, validation_fraction, limit, seed)
    if info(name).kind == "audio":
        return audio.mfcc_arrays(raw), labels
    return (raw.astype(np.float32) / 255.0).reshape((-1, *info(name).input_shape)), labels


class _ImageAugmentation:
    """MLPerf Tiny's image augmentation: rotation up to 15 degrees, shifts up to 10%, horizontal flip."""

    def __init__(self, flip, seed):
        self.seed = seed
        self.layers = [
            keras.layers.RandomRotation(15 / 360, fill_mode="nearest", seed=seed),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed + 1),
        ]
        if flip:
            self.layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 2))

    def start_epoch(self, epoch):
        """Sets the layers' random states to the start of `epoch` (a scalar int64 tensor); returns the assignments."""
        states = [state for layer in self.layers for state in seeding.seed_states(layer)]
        return [state.assign(tf.stack([tf.constant(seeding.stream_seed(self.seed, "augment", i), tf.int64),
                                       epoch * seeding.EPOCH_STRIDE]))
                for i, state in enumerate(states)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x, training=True)
        return x


def load(name, split, batch_size=32, shuffle=None, seed=0, validation_fraction=0.1, limit=None,
         drop_remainder=False, augment=False, epoch=None):
    """Loads a split as a batched `tf.data.Dataset` of `(x, y)`, held in memory.

    Every pass over the dataset reads the epoch number once; its order and its
    augmentation draws depend only on `seed` and that number. A run resumed at
    epoch e therefore sees the same batches as an uninterrupted one, provided
    the epoch variable is set at the start of each epoch
    (`tinyrobust.callbacks.SeedEachEpoch` does it).

    Args:
        name: dataset name (see `NAMES`).
        split: "train", "validation" or "test".
        batch_size: examples per batch.
        shuffle: shuffle every pass; defaults to True for "train".
        seed: seed of the shuffling, the augmentation and the train/validation
            partition.
        validation_fraction: fraction of the training data held out.
        limit: keep the first `limit` examples, or None.
        drop_remainder: drop the last incomplete batch.
        augment: apply MLPerf Tiny's augmentation (images: rotation, shift,
            flip where valid; audio: background noise before the MFCCs).
        epoch: a scalar int64 `tf.Variable` holding the number of the next
            pass; each pass reads it and adds one. None: a variable of the
            dataset's own, starting at 0 (every pass differs).

    Returns:
        A `tf.data.Dataset` yielding `(x, y)` batches, prefetched.
    """
    check_number("batch_size", batch_size, low=1, integer=True)
    dataset_info = info(name)
    audio_augment = augment and dataset_info.kind == "audio"
    if audio_augment:
        x, y = load_raw(name, split, validation_fraction, limit, seed)
    else:
        x, y = load_arrays(name, split, validation_fraction=validation_fraction, limit=limit, seed=seed)
    if epoch is None:
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    elif not (isinstance(epoch, tf.Variable) and epoch.dtype == tf.int64 and epoch.shape.rank == 0):
        raise ValueError(f"Expected a scalar int64 tf.Variable or None. Received: epoch={epoch!r}")
    augmentation = _ImageAugmentation(dataset_info.flip, seed) if augment and not audio_augment else None
    shuffle = split == "train" if shuffle is None else shuffle
    order_seed = seeding.stream_seed(seed, "order")
    x_all, y_all = tf.Variable(x, trainable=False), tf.Variable(y, trainable=False)

    def start_pass(_):
        current = epoch.assign_add(1) - 1
        with tf.control_dependencies(augmentation.start_epoch(current) if augmentation is not None else []):
            index = tf.range(len(y), dtype=tf.int64)
            if shuffle:
                index = tf.random.experimental.stateless_shuffle(index, seed=tf.stack([order_seed, current]))
            return index, tf.fill([len(y)], current)

    passes = tf.data.Dataset.from_tensors(0).map(start_pass).unbatch()
    dataset = passes.batch(batch_size, drop_remainder=drop_remainder).enumerate()
    dataset = dataset.map(lambda step, batch: (tf.gather(x_all, batch[0]), tf.gather(y_all, batch[0]),
                                               tf.stack([step, batch[1][0]])))
    if audio_augment:
        noise_seed = seeding.stream_seed(seed, "noise")

        def add_noise(clips, labels, step_epoch):
            draw = tf.stack([noise_seed, step_epoch[1] * seeding.EPOCH_STRIDE + step_epoch[0]])
            return audio.mfcc(audio.add_background_noise(audio.to_float(clips), draw)), labels

        dataset = dataset.map(add_noise, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    elif augmentation is not None:
        dataset = dataset.map(lambda images, labels, _: (augmentation(images), labels))
    else:
        dataset = dataset.map(lambda inputs, labels, _: (inputs, labels))
    return dataset.prefetch(tf.data.AUTOTUNE)


def calibration_set(name, size=200, seed=0):
    """A representative set for int8 calibration, drawn from the train split.

    Args:
        name: dataset name.
        size: number of examples.
        seed: seed of the draw.

    Returns:
        `(x, indices)`: the inputs and their indices within the "train" split.
    """
    raw, _ = load_raw(name, "train", seed=seed)
    check_number("size", size, low=1, high=len(raw), integer=True)
    indices = np.sort(np.random.default_rng(seed).choice(len(raw), size=size, replace=False))
    x = features(name, raw[indices])
    return np.asarray(x).reshape((-1, *info(name).input_shape)), indices
