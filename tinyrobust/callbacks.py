"""Keras callbacks for robust, quantized training.

The schedulers set variables read inside the compiled train step, so they take
effect without retracing; they are set at the start of every epoch from the
epoch number alone, which keeps resumed runs (`keras.callbacks.BackupAndRestore`)
on the same schedule.
"""

import pathlib

import keras
import numpy as np
from keras import ops

from tinyrobust import attacks, export, quantizers, seeding
from tinyrobust.validation import check_number

__all__ = ["CosineLearningRate", "JacobianWeightScheduler", "EpsilonScheduler", "QuantizationNoiseScheduler",
           "RobustAccuracy", "TFLiteExport", "StopOnNonFiniteLoss", "SeedEachEpoch"]


def _ramp(epoch, start_epoch, ramp_epochs, start, end):
    """Linear from `start` at `start_epoch` to `end` after `ramp_epochs` more epochs."""
    if epoch < start_epoch:
        return start
    if ramp_epochs == 0:
        return end
    fraction = min(1.0, (epoch - start_epoch + 1) / ramp_epochs)
    return start + fraction * (end - start)


class _RampScheduler(keras.callbacks.Callback):
    attribute = None

    def __init__(self, ramp_epochs, start_epoch=0, start=0.0, end=1.0):
        super().__init__()
        self.ramp_epochs = check_number("ramp_epochs", ramp_epochs, low=0, integer=True)
        self.start_epoch = check_number("start_epoch", start_epoch, low=0, integer=True)
        self.start, self.end = float(start), float(end)

    def value(self, epoch):
        """The scheduled value at `epoch` (0-based)."""
        return _ramp(epoch, self.start_epoch, self.ramp_epochs, self.start, self.end)

    def _variables(self):
        variable = getattr(self.model, self.attribute, None)
        if variable is None:
            raise ValueError(f"{type(self).__name__} needs a tinyrobust.RobustModel. Received: model={self.model.name!r}")
        return [variable]

    def on_epoch_begin(self, epoch, logs=None):
        for variable in self._variables():
            variable.assign(self.value(epoch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[self.log_name] = self.value(epoch)


class JacobianWeightScheduler(_RampScheduler):
    """Warms up the Jacobian terms: their weights are multiplied by a factor
    rising linearly from `start` to `end` over `ramp_epochs` epochs.

    Args:
        ramp_epochs: epochs of the ramp (0: jump to `end` at `start_epoch`).
        start_epoch: epochs at `start` before the ramp begins.
        start: factor before the ramp.
        end: factor after the ramp.
    """

    attribute = "jacobian_scale"
    log_name = "jacobian_scale"


class EpsilonScheduler(_RampScheduler):
    """Ramps the adversarial-training epsilon from `start * eps` to `end * eps`.

    Args:
        ramp_epochs: epochs of the ramp.
        start_epoch: epochs at `start` before the ramp begins.
        start: fraction of epsilon before the ramp.
        end: fraction of epsilon after the ramp.
    """

    attribute = "epsilon_scale"
    log_name = "epsilon_scale"


class QuantizationNoiseScheduler(_RampScheduler):
    """Fades the stochasticity of stochastic quantizers (STQ, STB) in the model,
    from `start` (1: unbiased stochastic rounding) to `end` (0: deterministic).

    Args:
        ramp_epochs: epochs of the fade.
        start_epoch: epochs at `start` before the fade begins.
        start: stochasticity before the fade.
        end: stochasticity after the fade.
    """

    log_name = "stochasticity"

    def __init__(self, ramp_epochs, start_epoch=0, start=1.0, end=0.0):
        for name, value in (("start", start), ("end", end)):
            check_number(name, value, low=0, high=1)
        super().__init__(ramp_epochs, start_epoch, start, end)

    def _variables(self):
        found = [quantizer.stochasticity for quantizer in quantizers.stochastic_quantizers(self.model)]
        if not found:
            raise ValueError(f"The model has no stochastic quantizer to schedule. Received: model={self.model.name!r}")
        return found


class CosineLearningRate(keras.callbacks.Callback):
    """Sets the optimizer's learning rate at the start of every epoch: a linear
    warm-up, then a cosine decay to `final_fraction * learning_rate` at the
    end of training.

    Epoch e < `warmup_epochs` trains at `learning_rate * (e + 1) / warmup_epochs`;
    later epochs follow `final + (1 - final) * (1 + cos(pi * t)) / 2` times
    `learning_rate`, t = (e - warmup_epochs) / (epochs - warmup_epochs).
    `final_fraction=1` gives a constant rate after the warm-up. The rate depends
    only on the epoch number, so a resumed run stays on the schedule.

    Args:
        learning_rate: peak learning rate.
        epochs: epochs of the whole run.
        warmup_epochs: epochs of linear warm-up (0: none).
        final_fraction: the decay's end, as a fraction of `learning_rate`.
    """

    def __init__(self, learning_rate, epochs, warmup_epochs=0, final_fraction=0.0):
        super().__init__()
        self.learning_rate = check_number("learning_rate", learning_rate, low=0, low_open=True)
        self.epochs = check_number("epochs", epochs, low=1, integer=True)
        self.warmup_epochs = check_number("warmup_epochs", warmup_epochs, low=0, high=epochs - 1, integer=True)
        self.final_fraction = check_number("final_fraction", final_fraction, low=0, high=1)

    def value(self, epoch):
        """The learning rate of epoch `epoch` (0-based)."""
        if epoch < self.warmup_epochs:
            return self.learning_rate * (epoch + 1) / self.warmup_epochs
        t = (epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs)
        cosine = 0.5 * (1.0 + np.cos(np.pi * min(t, 1.0)))
        return self.learning_rate * (self.final_fraction + (1.0 - self.final_fraction) * cosine)

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate = self.value(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.value(epoch)


class RobustAccuracy(keras.callbacks.Callback):
    """Accuracy under an attack on held-out data, logged as `<name>` every `every` epochs.

    The value is written into the epoch's logs, so `ModelCheckpoint`,
    `EarlyStopping`, `CSVLogger` and TensorBoard see it like any metric.

    Args:
        x: held-out inputs (a small subset: attacks are costly).
        y: integer labels.
        attack: callable `attack(model, x, y) -> x_adv` (e.g. a tinyrobust
            attack with one eps); default `attacks.PGD(epsilon, steps=10)`,
            L-inf, step `epsilon / 4`, random start.
        epsilon: radius of the default attack.
        every: evaluate every `every` epochs (and always on the last epoch).
        batch_size: examples per attack batch.
        name: log key.
    """

    def __init__(self, x, y, attack=None, epsilon=8 / 255, every=1, batch_size=256, name="robust_accuracy"):
        super().__init__()
        self.x, self.y = np.asarray(x), np.asarray(y)
        if len(self.x) == 0 or len(self.x) != len(self.y):
            raise ValueError(f"Expected non-empty `x` and `y` of equal length. Received: len(x)={len(self.x)}, len(y)={len(self.y)}")
        self.every = check_number("every", every, low=1, integer=True)
        self.attack = attack or attacks.PGD(epsilon, steps=10, rel_step_size=0.25)
        self.batch_size = batch_size
        self.name = name
        self._last = None

    def evaluate(self):
        """Accuracy of the current model under the attack."""
        correct = 0
        for i in range(0, len(self.x), self.batch_size):
            x, y = self.x[i: i + self.batch_size], self.y[i: i + self.batch_size]
            x_adv = self.attack(self.model, x, y)
            predictions = np.argmax(ops.convert_to_numpy(self.model(x_adv, training=False)), axis=-1)
            correct += int(np.sum(predictions == y))
        return correct / len(self.x)

    def on_epoch_end(self, epoch, logs=None):
        last = self.params.get("epochs") is not None and epoch + 1 == self.params["epochs"]
        if (epoch + 1) % self.every == 0 or last or self._last is None:
            self._last = self.evaluate()
        if logs is not None:
            logs[self.name] = self._last



class SeedEachEpoch(keras.callbacks.Callback):
    """Starts every epoch from random states that depend only on the seed and the epoch number.

    At the start of epoch e it sets every `keras.random.SeedGenerator` the model
    tracks (quantization noise, dropout, adversarial starts, Jacobian
    projections) and, when given, the epoch variable of the training data
    (`tinyrobust.data.load(..., epoch=...)`) to e. With
    `keras.callbacks.BackupAndRestore`, which restores weights and optimizer,
    a run interrupted at any point and rerun ends bit for bit like an
    uninterrupted one (on CPU).

    Args:
        seed: the run's integer seed.
        epoch: the data's scalar int64 `tf.Variable`, or None.
    """

    def __init__(self, seed, epoch=None):
        super().__init__()
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        seeding.reseed(self.model, self.seed, epoch)
        if self.epoch is not None:
            self.epoch.assign(epoch)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training with an error as soon as a logged loss is NaN or infinite.

    Unlike `keras.callbacks.TerminateOnNaN`, which ends training quietly (and
    lets a script go on to evaluate and export a broken model), this raises,
    so nothing downstream runs on NaN weights.

    Raises:
        ValueError: naming the log key, its value and the epoch and batch.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        for key, value in (logs or {}).items():
            if (key == "loss" or key.endswith("loss") or key in ("ce", "jacobian", "distill")) and value is not None:
                value = float(value)
                if not np.isfinite(value):
                    raise ValueError(
                        f"Training diverged: `{key}` is {value} at epoch {self._epoch + 1}, batch {batch + 1}; "
                        f"nothing was evaluated or exported. Lower the learning rate or the Jacobian/adversarial "
                        f"weights. Received: {key}={value}")


class TFLiteExport(keras.callbacks.Callback):
    """Exports the best model to int8 TFLite (optionally compressed) at the end of training and verifies it.

    Keeps the weights of the best epoch by `monitor` (or the final weights
    when `monitor` is None), exports them with `tinyrobust.export.to_tflite`,
    writes the C array and a parity report (`<name>.parity.json`) next to the
    `.tflite` file, and leaves the model's final weights in place. The report
    is also kept as `self.report`.

    Args:
        out_dir: directory for `<name>.tflite`, `<name>.h/.cc` and the report.
        representative_data: calibration inputs from the train split.
        validation_data: `(x, y)` arrays on which parity is measured.
        monitor: log key choosing the best epoch (e.g. "val_accuracy",
            "robust_accuracy"), or None for the last epoch.
        mode: "max" or "min" for `monitor`.
        name: base file name and C array name.
        compress: ship low-bit (ternary, binary, int4) weights below int8
            through TFLite Micro's LUT compression, bit-exact with the int8
            file (see `tinyrobust.export.to_tflite`).
    """

    def __init__(self, out_dir, representative_data, validation_data, monitor=None, mode="max", name="model",
                 compress=False):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"Expected `mode` to be 'max' or 'min'. Received: mode={mode!r}")
        if not isinstance(validation_data, tuple) or len(validation_data) != 2:
            raise ValueError("Expected `validation_data` to be an (x, y) tuple. "
                             f"Received: validation_data of type {type(validation_data).__name__}")
        self.out_dir = pathlib.Path(out_dir)
        self.representative_data = representative_data
        self.validation_data = validation_data
        if not isinstance(compress, bool):
            raise ValueError(f"Expected `compress` to be True or False. Received: compress={compress!r}")
        self.monitor, self.mode, self.name, self.compress = monitor, mode, name, compress
        self.best, self.best_epoch, self._best_weights = None, None, None
        self.report = None

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is None:
            return
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise ValueError(f"TFLiteExport monitors {self.monitor!r}, which is not in the logs: {sorted(logs or {})}. "
                             f"Received: monitor={self.monitor!r}")
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch = float(value), epoch
            self._best_weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        final_weights = self.model.get_weights()
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)
        try:
            _, self.report = export.export_and_verify(
                self.model, self.out_dir, self.name, self.representative_data, self.validation_data,
                record={"best_epoch": self.best_epoch, "monitor": self.monitor, "best": self.best},
                compress=self.compress)
        finally:
            self.model.set_weights(final_weights)
