"""The tfds data sets: CIFAR-10, SVHN (cropped) and Speech Commands."""

import numpy as np

from tinyrobust.data.audio import CLIP_SAMPLES


def _load(tfds_name, split):
    import tensorflow_datasets as tfds

    try:
        return tfds.load(tfds_name, split=split, as_supervised=True, shuffle_files=False)
    except Exception as error:  # tfds raises many kinds of download / preparation errors
        raise FileNotFoundError(
            f"tensorflow-datasets could not load {tfds_name!r} split {split!r}: {error}. Prepare it on a machine "
            "with network access (tfds build) and point TFDS_DATA_DIR at the prepared folder."
        ) from None


def read_images(tfds_name, split):
    """All images and labels of a tfds image split as uint8 / int32 numpy arrays."""
    import tensorflow_datasets as tfds

    images, labels = [], []
    for image, label in tfds.as_numpy(_load(tfds_name, split).batch(4096)):
        images.append(image)
        labels.append(label)
    if not images:
        return np.zeros((0, 0, 0, 0), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)


def read_speech_commands(split):
    """All clips of a Speech Commands split, zero-padded or cropped to 16000 int16 samples."""
    import tensorflow_datasets as tfds

    clips, labels = [], []
    for audio, label in tfds.as_numpy(_load("speech_commands", split)):
        clip = np.zeros(CLIP_SAMPLES, np.int16)
        audio = np.asarray(audio, np.int16)[:CLIP_SAMPLES]
        clip[: len(audio)] = audio
        clips.append(clip)
        labels.append(label)
    return np.stack(clips) if clips else np.zeros((0, CLIP_SAMPLES), np.int16), np.asarray(labels, np.int32)
