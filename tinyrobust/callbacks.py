"""Keras callbacks for robust, quantized training.

The schedulers set variables read inside the compiled train step, so they take
effect without retracing; they are set at the start of every epoch from the
epoch number alone, which keeps resumed runs (`keras.callbacks.BackupAndRestore`)
on the same schedule.
"""

import json
import pathlib

import keras
import numpy as np
from keras import ops

from tinyrobust import attacks, export, files, multiexit, quantizers, seeding
from tinyrobust.validation import check_choice, check_number

__all__ = ["CosineLearningRate", "JacobianWeightScheduler", "EpsilonScheduler", "QuantizationNoiseScheduler",
           "RobustAccuracy", "RobustEarlyStopping", "TFLiteExport", "StopOnNonFiniteLoss", "SeedEachEpoch"]


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
        exit: for a multi-exit model, "final" (the accuracy of its last
            output) or "weakest" (the lowest accuracy over its exits on the
            attack's examples, e.g. with `multiexit.MultiExitPGD`).
    """

    def __init__(self, x, y, attack=None, epsilon=8 / 255, every=1, batch_size=256, name="robust_accuracy",
                 exit="final"):
        super().__init__()
        self.exit = check_choice("exit", exit, ("final", "weakest"))
        self.x, self.y = np.asarray(x), np.asarray(y)
        if len(self.x) == 0 or len(self.x) != len(self.y):
            raise ValueError(f"Expected non-empty `x` and `y` of equal length. Received: len(x)={len(self.x)}, len(y)={len(self.y)}")
        self.every = check_number("every", every, low=1, integer=True)
        self.attack = attack or attacks.PGD(epsilon, steps=10, rel_step_size=0.25)
        self.batch_size = batch_size
        self.name = name
        self._last = None

    def evaluate(self):
        """Accuracy of the current model under the attack: of its last output, or with `exit="weakest"` the
        lowest over the exits of a multi-exit model (attacked as a whole)."""
        multi = len(getattr(self.model, "outputs", None) or []) > 1
        weakest = multi and self.exit == "weakest"
        model = self.model if weakest or not getattr(self.model, "outputs", None) else multiexit.final_exit(self.model)
        correct = 0
        for i in range(0, len(self.x), self.batch_size):
            x, y = self.x[i: i + self.batch_size], self.y[i: i + self.batch_size]
            x_adv = self.attack(model, x, y)
            outputs = model(x_adv, training=False)
            outputs = outputs if weakest else [outputs]
            correct = correct + np.array([np.sum(np.argmax(ops.convert_to_numpy(z), -1) == y) for z in outputs])
        return float(np.min(correct)) / len(self.x)

    def on_epoch_end(self, epoch, logs=None):
        last = self.params.get("epochs") is not None and epoch + 1 == self.params["epochs"]
        if (epoch + 1) % self.every == 0 or last or self._last is None:
            self._last = self.evaluate()
        if logs is not None:
            logs[self.name] = self._last



def _scheduled_variables(model):
    """The variables the schedulers above set at every epoch (not learned, so never restored)."""
    found = [getattr(model, scheduler.attribute, None) for scheduler in (JacobianWeightScheduler, EpsilonScheduler)]
    found += [quantizer.stochasticity for quantizer in quantizers.stochastic_quantizers(model)]
    return {id(v) for v in found if v is not None}


class RobustEarlyStopping(RobustAccuracy):
    """Keeps the weights of the epoch with the best held-out robust accuracy, and stops on a collapse.

    Single-step adversarial training (FGSM, FGSM-RS) can overfit
    catastrophically: within an epoch, robustness to multi-step attacks falls
    to near zero while FGSM accuracy stays high (Wong et al., 2020, "Fast is
    better than free"). After every epoch this callback attacks held-out
    training data (never the test set) and logs the accuracy as `name`; when
    it falls more than `collapse` below the best so far, training stops. At
    the end of training the weights of the best epoch are put back (learned
    weights and batch-norm statistics; the schedulers' variables keep their
    last values). With `path`, the best weights and the per-epoch record are
    kept on disk, so a run resumed by `keras.callbacks.BackupAndRestore`
    selects exactly as an uninterrupted one; put this callback before
    `BackupAndRestore` in the list, so an epoch is recorded here before it is
    backed up. A run resumed after it had stopped trains one more batch
    (Keras reads `stop_training` after a batch), then ends with the same best
    weights.

    Args:
        x: held-out inputs (e.g. the "validation" split of
            `tinyrobust.data.load_arrays`).
        y: integer labels.
        epsilon: radius of the default attack.
        attack: callable `attack(model, x, y) -> x_adv`; default
            `attacks.PGD(epsilon, steps=10)`, L-inf, step `epsilon / 4`, one
            random start with a fixed seed (the same start every epoch).
        collapse: stop when the accuracy falls more than this (a fraction, in
            (0, 1]) below the best epoch's; None never stops early.
        restore_best_weights: put the best epoch's weights back at the end.
        path: folder for `best.weights.npz` and `early_stopping.json`, or None
            to keep them in memory only.
        batch_size: examples per attack batch.
        name: log key.
        exit: "final" or "weakest" (see `RobustAccuracy`).
        keep_from_epoch: the first 0-based epoch whose weights may be kept
            (e.g. the first epoch trained with the quantization noise fully
            annealed, so the kept model is the one the comparison means);
            earlier epochs are checked and count for the collapse rule, but
            are kept only if training stops before any later one.

    Attributes:
        history: held-out robust accuracy per finished epoch.
        best_epoch: 0-based epoch of the best accuracy among the epochs that
            may be kept (the first of ties).
        stopped_epoch: 0-based epoch after which training stopped, or None.
    """

    def __init__(self, x, y, epsilon=8 / 255, attack=None, collapse=0.2, restore_best_weights=True, path=None,
                 batch_size=256, name="robust_accuracy", exit="final", keep_from_epoch=0):
        super().__init__(x, y, attack=attack, epsilon=epsilon, batch_size=batch_size, name=name, exit=exit)
        self.keep_from_epoch = check_number("keep_from_epoch", keep_from_epoch, low=0, integer=True)
        if collapse is not None:
            check_number("collapse", collapse, low=0, low_open=True, high=1)
        if not isinstance(restore_best_weights, bool):
            raise ValueError("Expected `restore_best_weights` to be True or False. "
                             f"Received: restore_best_weights={restore_best_weights!r}")
        self.collapse, self.restore_best_weights = collapse, restore_best_weights
        self.path = None if path is None else pathlib.Path(path)
        self.history, self.best_epoch, self.stopped_epoch = [], None, None
        self._best_weights = None

    def record(self):
        """The outcome as a JSON-ready dict: `robust_accuracy` per epoch, `best_epoch` and `stopped_epoch`
        (1-based, None when training ran every epoch)."""
        record = {"robust_accuracy": list(self.history),
                  "best_epoch": None if self.best_epoch is None else self.best_epoch + 1,
                  "stopped_epoch": None if self.stopped_epoch is None else self.stopped_epoch + 1}
        if self.keep_from_epoch:  # absent when every epoch may be kept, as records before the option had it
            record["keep_from_epoch"] = self.keep_from_epoch + 1
        return record

    def _learned(self):
        scheduled = _scheduled_variables(self.model)
        return [v for v in self.model.weights if id(v) not in scheduled]

    def on_train_begin(self, logs=None):
        self.history, self.best_epoch, self.stopped_epoch, self._best_weights = [], None, None, None
        if self.path is None or not (self.path / "early_stopping.json").exists():
            return
        record = json.loads((self.path / "early_stopping.json").read_text())
        self.history = [float(v) for v in record["robust_accuracy"]]
        self.best_epoch = record["best_epoch"] - 1
        self.stopped_epoch = None if record["stopped_epoch"] is None else record["stopped_epoch"] - 1
        with np.load(self.path / "best.weights.npz") as stored:
            self._best_weights = [stored[f"w{i}"] for i in range(len(stored.files))]
        if self.stopped_epoch is not None:  # stopped before an interruption: train no further
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.stopped_epoch is not None:  # the run resumed after stopping: nothing new to select
            return
        del self.history[epoch:]  # an epoch recorded before an interruption and trained again
        value = self.evaluate()
        self.history.append(value)
        if logs is not None:
            logs[self.name] = value
        first = self.keep_from_epoch if epoch >= self.keep_from_epoch else 0
        self.best_epoch = first + int(np.argmax(self.history[first:]))
        if self.best_epoch == epoch:
            self._best_weights = [ops.convert_to_numpy(v) for v in self._learned()]
        if self.collapse is not None and value < max(self.history) - self.collapse:
            self.stopped_epoch = epoch
            self.model.stop_training = True
        if self.path is not None:
            if self.best_epoch == epoch:
                with files.atomic_path(self.path / "best.weights.npz") as partial:
                    np.savez(partial, **{f"w{i}": w for i, w in enumerate(self._best_weights)})
            files.write_json(self.path / "early_stopping.json", self.record(), indent=None)

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self._best_weights is not None:
            for variable, value in zip(self._learned(), self._best_weights):
                variable.assign(value)


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
        input_range: the model's valid inputs (calibration inputs outside it are refused).
    """

    def __init__(self, out_dir, representative_data, validation_data, monitor=None, mode="max", name="model",
                 compress=False, input_range=(0.0, 1.0)):
        super().__init__()
        self.input_range = input_range
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
                compress=self.compress, input_range=self.input_range)
        finally:
            self.model.set_weights(final_weights)
