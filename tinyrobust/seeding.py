"""Random states that depend only on a seed and the epoch number.

An epoch whose randomness (data order, augmentation, quantization noise,
adversarial starts, Jacobian projections) is a function of `(seed, epoch)` alone
runs the same whether the run started at epoch 0 or was resumed from a backup
of the epoch before: that is what makes an interrupted run end bit for bit like
an uninterrupted one. `tinyrobust.callbacks.SeedEachEpoch` applies it to a model,
`tinyrobust.data.load(..., epoch=...)` to the training data.
"""

import zlib

import numpy as np

__all__ = ["EPOCH_STRIDE", "stream_seed", "epoch_state", "seed_states", "reseed"]

# A SeedGenerator counts its draws in the second word of its state; epoch e starts
# that word at e * EPOCH_STRIDE, so two epochs' draws never meet.
EPOCH_STRIDE = 2**32


def stream_seed(seed, *stream):
    """A 31-bit seed for one named random stream, derived from `seed`.

    Args:
        seed: the run's integer seed.
        *stream: names (str) or indices (int) naming the stream.

    Returns:
        A Python int in [0, 2**31).
    """
    words = [int(seed) % 2**32] + [zlib.crc32(s.encode()) if isinstance(s, str) else int(s) % 2**32 for s in stream]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


def epoch_state(seed, epoch):
    """The `keras.random.SeedGenerator` state that starts `epoch` of the stream seeded `seed`."""
    return np.array([seed, int(epoch) * EPOCH_STRIDE], dtype="int64")


def seed_states(model):
    """The state variables of every `keras.random.SeedGenerator` that `model` tracks, in a fixed order.

    Args:
        model: a Keras layer or model.

    Returns:
        A list of variables, each once, in the order of `model.variables`.
    """
    states, seen = [], set()
    for variable in model.variables:
        if variable.name == "seed_generator_state" and id(variable) not in seen:
            seen.add(id(variable))
            states.append(variable)
    return states


def reseed(model, seed, epoch):
    """Sets every random state of `model` to the start of `epoch` for the run seeded `seed`.

    Args:
        model: a Keras layer or model.
        seed: the run's integer seed.
        epoch: the 0-based epoch about to start.
    """
    for index, state in enumerate(seed_states(model)):
        state.assign(epoch_state(stream_seed(seed, "model", index), epoch))
