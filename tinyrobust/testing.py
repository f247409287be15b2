"""Test helpers for users who write their own quantized layers."""

import os
import tempfile

import keras
import numpy as np

__all__ = ["layer_test"]


def layer_test(layer_cls, kwargs, input_shape, seed=0):
    """Checks the contract every tinyrobust layer keeps.

    1. `get_config` round-trips through `from_config` unchanged.
    2. Inference is deterministic, and a clone from the config with the same
       weights gives the same outputs.
    3. A model holding the layer saves to `.keras` and reloads with identical
       outputs.
    4. One `train_on_batch` step runs, gives a finite loss and moves the weights.

    Args:
        layer_cls: the layer class.
        kwargs: constructor arguments.
        input_shape: input shape including the batch dimension.
        seed: seed of the random inputs and targets.

    Returns:
        The model built around the layer, after its training step.

    Raises:
        AssertionError: a check failed.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=input_shape).astype("float32")

    layer = layer_cls(**kwargs)
    config = layer.get_config()
    assert layer_cls.from_config(config).get_config() == config, "config does not round-trip"

    inputs = keras.Input(input_shape[1:])
    model = keras.Model(inputs, layer(inputs))
    first = model.predict(x, verbose=0)
    np.testing.assert_array_equal(first, model.predict(x, verbose=0), err_msg="inference is not deterministic")

    clone = layer_cls.from_config(config)
    clone_model = keras.Model(inputs, clone(inputs))
    clone_model.set_weights(model.get_weights())
    np.testing.assert_allclose(clone_model.predict(x, verbose=0), first, rtol=1e-6, atol=1e-6,
                               err_msg="a clone with the same weights differs")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), first, err_msg=".keras reload changed outputs")

    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    target = rng.normal(size=first.shape).astype("float32")
    loss = model.train_on_batch(x, target)
    assert np.isfinite(loss), f"training loss is not finite: {loss}"
    moved = any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert moved or not model.trainable_weights, "a training step left every weight unchanged"
    return model
