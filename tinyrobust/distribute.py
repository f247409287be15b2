"""Training on several devices (`MirroredStrategy`) and several machines (`MultiWorkerMirroredStrategy`).

Batch sizes are global: a batch of 256 on 4 replicas gives each replica 64
examples, and `RobustModel` divides each replica's loss by the replica count so
that the summed gradients are those of the 256-example mean (the same step as one
device on the whole batch).

Keras 3.15's `Model.fit` fails under `MultiWorkerMirroredStrategy` before the first
step (keras-team/keras#20585): its `_maybe_symbolic_build` reduces the per-replica
input batch across workers and raises `ValueError: Attempt to convert a value
(PerReplica:{...}) with an unsupported type (<class
'tensorflow.python.distribute.values.PerReplica'>) to a Tensor.` `fit` here takes
the working path there: the model's own `train_step` under `strategy.run`, with
Keras callbacks and a `History`.
"""

import keras
import tensorflow as tf

from tinyrobust.validation import check_choice, check_number

__all__ = ["KINDS", "strategy", "fit"]

KINDS = ("mirrored", "multi_worker")


def strategy(kind=None):
    """The `tf.distribute` strategy of `kind`.

    Args:
        kind: None (the default strategy: one device), "mirrored" (every
            local GPU, or the CPU) or "multi_worker" (the cluster in the
            `TF_CONFIG` environment variable; every worker runs the same
            program).

    Returns:
        A `tf.distribute.Strategy`; build and compile the model in its `scope()`.
    """
    if kind is None:
        return tf.distribute.get_strategy()
    kind = check_choice("distribute", kind, KINDS)
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.MultiWorkerMirroredStrategy()


def fit(model, dataset, epochs=1, callbacks=None, verbose=0, initial_epoch=0):
    """`model.fit(dataset, ...)`, or under `MultiWorkerMirroredStrategy` the equivalent loop.

    Args:
        model: a compiled model, built and compiled in its strategy's scope.
        dataset: a `tf.data.Dataset` of global batches.
        epochs: index of the last epoch.
        callbacks: Keras callbacks (`BackupAndRestore`, schedulers, ...).
        verbose: Keras verbosity (the multi-worker loop is silent).
        initial_epoch: epoch to start from.

    Returns:
        The `keras.callbacks.History`.
    """
    check_number("epochs", epochs, low=0, integer=True)
    if not isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return model.fit(dataset, epochs=epochs, callbacks=callbacks, verbose=verbose, shuffle=False,
                         initial_epoch=initial_epoch)
    return _fit_multi_worker(model, dataset, epochs, list(callbacks or []), initial_epoch)


def _fit_multi_worker(model, dataset, epochs, callbacks, initial_epoch):
    strategy = model.distribute_strategy
    history = keras.callbacks.History()
    hooks = keras.callbacks.CallbackList(callbacks + [history], model=model, epochs=epochs, verbose=0)
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    batches = strategy.experimental_distribute_dataset(dataset)

    @tf.function
    def step(batch):
        strategy.run(model.train_step, args=(batch,))

    model.stop_training = False
    hooks.on_train_begin()
    # `BackupAndRestore` tells the epoch to resume from as it tells Keras' own fit.
    start = getattr(model, "_initial_epoch", None) or initial_epoch
    logs = {}
    for epoch in range(start, epochs):
        model.reset_metrics()
        hooks.on_epoch_begin(epoch)
        for index, batch in enumerate(batches):
            hooks.on_train_batch_begin(index)
            step(batch)
            logs = {name: float(value) for name, value in model.get_metrics_result().items()}
            hooks.on_train_batch_end(index, logs)
            if model.stop_training:
                break
        hooks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    hooks.on_train_end(logs)
    return history
