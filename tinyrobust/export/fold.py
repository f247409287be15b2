"""Fold quantizers and batch norm into a plain Keras model.

The TFLite converter does not understand qkeras' quantizers (they leave float
ROUND/POW ops that TFLite Micro cannot run). `fold_model` builds a clone made
of plain Keras layers whose weights are the deterministic quantized weights
of the original, with each batch norm that directly follows a convolution or
dense layer folded into that layer's kernel and bias.
"""

import keras
import numpy as np

from tinyrobust import layers as qlayers
from tinyrobust import models
from tinyrobust import quantizers

_LINEAR_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
_QUANTIZER_ARGUMENTS = ("kernel_quantizer", "bias_quantizer", "depthwise_quantizer")


@keras.saving.register_keras_serializable(package="tinyrobust")
class FoldedBatchNorm(keras.layers.Layer):
    """Marks where a batch norm was folded into the layer before it; passes its input through."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _producer(tensor):
    return tensor._keras_history[0]


def _consumers(model):
    """Number of uses of each layer's output inside `model` (model outputs count)."""
    counts = {}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                producer = _producer(tensor)
                counts[id(producer)] = counts.get(id(producer), 0) + 1
    for tensor in model.outputs:
        producer = _producer(tensor)
        counts[id(producer)] = counts.get(id(producer), 0) + 1
    return counts


def _is_linear(layer):
    activation = getattr(layer, "activation", None)
    return activation is None or activation is keras.activations.linear


def _foldable_pairs(model):
    """Maps each batch norm layer that can be folded to the layer it folds into."""
    consumers = _consumers(model)
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        if layer.axis not in (-1, len(layer.input.shape) - 1):
            continue
        producer = _producer(layer._inbound_nodes[0].input_tensors[0])
        if (isinstance(producer, _LINEAR_LAYERS) and _is_linear(producer)
                and len(producer._inbound_nodes) == 1 and consumers.get(id(producer)) == 1):
            pairs[layer.name] = producer
    return pairs


def _plain_config(layer):
    config = layer.get_config()
    for argument in _QUANTIZER_ARGUMENTS:
        config.pop(argument, None)
    return config


def _plain_layer(layer, folded_into):
    """The plain Keras layer that replaces `layer` in the folded clone."""
    if isinstance(layer, keras.layers.BatchNormalization) and layer.name in folded_into:
        return FoldedBatchNorm(name=layer.name)
    targets = {target.name for target in folded_into.values()}
    if isinstance(layer, qlayers._QuantizedWeightsMixin):
        config = _plain_config(layer)
        config["use_bias"] = config["use_bias"] or layer.name in targets
        return layer._keras_base.from_config(config)
    if isinstance(layer, qlayers.QActivation):
        if layer.quantizer is None:
            return keras.layers.Activation(layer._activation_name, name=layer.name)
        if isinstance(layer.quantizer, quantizers.QuantizedReLU):
            return keras.layers.ReLU(max_value=layer.quantizer.max_value, name=layer.name)
        raise ValueError(
            f"Cannot export the activation quantizer of layer {layer.name!r}: only quantized ReLU "
            f"activations are supported. Received: {type(layer.quantizer).__name__}"
        )
    if isinstance(layer, _LINEAR_LAYERS) and layer.name in targets:
        config = layer.get_config()
        config["use_bias"] = True
        return layer.__class__.from_config(config)
    if type(layer).__module__.startswith("qkeras") or isinstance(layer, quantizers.Quantizer):
        raise ValueError(
            f"Cannot export layer {layer.name!r} of type {type(layer).__name__}: use tinyrobust.layers "
            "(QConv2D, QDepthwiseConv2D, QDense, QActivation) for quantized layers."
        )
    if isinstance(layer, keras.Model):
        raise ValueError(f"Cannot export nested model {layer.name!r}; flatten it into one functional model first.")
    return layer.__class__.from_config(layer.get_config())


def _weights(layer):
    """Deterministic (quantized) kernel and bias of a linear layer."""
    weights = qlayers.quantized_weights(layer)
    kernel = weights["kernel"].astype(np.float64)
    if "bias" in weights:
        bias = weights["bias"].astype(np.float64)
    else:
        bias = np.zeros(kernel.shape[-1] * (kernel.shape[-2] if isinstance(layer, keras.layers.DepthwiseConv2D)
                                           else 1))
    return kernel, bias


def _fold(layer, bn):
    """Kernel and bias of `layer` followed by batch norm `bn`."""
    kernel, bias = _weights(layer)
    gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else 1.0
    beta = keras.ops.convert_to_numpy(bn.beta) if bn.center else 0.0
    mean = keras.ops.convert_to_numpy(bn.moving_mean)
    variance = keras.ops.convert_to_numpy(bn.moving_variance)
    scale = np.asarray(gamma, np.float64) / np.sqrt(variance.astype(np.float64) + bn.epsilon)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    else:
        kernel = kernel * scale
    bias = (bias - mean) * scale + beta
    return kernel.astype(np.float32), bias.astype(np.float32)


def fold_model(model):
    """A plain Keras clone of `model` with quantizers and batch norms folded in.

    Every quantized kernel and bias is replaced by its deterministic quantized
    value (ternary kernels stay ternary: at most 3 values per output channel,
    also after batch-norm folding, which scales each channel). Quantized ReLUs
    become `ReLU(max_value=...)` with the same clipping; their grid is left
    to the int8 conversion.

    Args:
        model: a functional Keras model (tinyrobust quantized layers allowed).

    Returns:
        A functional `keras.Model` of plain Keras layers, same input and
        output names, computing the quantized model's inference function.

    Raises:
        ValueError: for a model that is not functional or holds layers that
            cannot be folded (qkeras layers, nested models, non-ReLU
            activation quantizers).
    """
    if not isinstance(model, keras.Model) or not hasattr(model, "_inbound_nodes") or not getattr(model, "inputs", None):
        raise ValueError(f"Expected a functional Keras model. Received: model={type(model).__name__}")
    folded_into = _foldable_pairs(model)
    clone = keras.models.clone_model(
        keras.Model(models.inputs_of(model), model.outputs, name=model.name),
        clone_function=lambda layer: _plain_layer(layer, folded_into),
    )
    targets = {target.name: bn for bn, target in ((model.get_layer(n), t) for n, t in folded_into.items())}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or layer.name in folded_into:
            continue
        plain = clone.get_layer(layer.name)
        if layer.name in targets:
            plain.set_weights(list(_fold(layer, targets[layer.name])))
        elif isinstance(layer, (qlayers._QuantizedWeightsMixin,)):
            weights = qlayers.quantized_weights(layer)
            plain.set_weights([weights[k] for k in ("kernel", "bias") if k in weights])
        elif layer.weights:
            plain.set_weights(layer.get_weights())
    return clone


def fold_quantized_weights(model):
    """A clone computing `model`'s inference function with its weight quantizers evaluated once.

    Quantized convolution and dense layers become plain Keras layers holding
    their deterministic quantized weights; batch norms and activation
    quantizers stay as they are. The clone gives the same outputs as
    `model(x, training=False)`, bit for bit, at a fraction of the cost of
    re-quantizing every weight on every call: attack it instead of the model.
    It is a snapshot: build it again after the weights change.

    Args:
        model: a functional Keras model (tinyrobust quantized layers allowed).

    Returns:
        A functional `keras.Model` (the model itself when nothing is quantized).

    Raises:
        ValueError: for a model that is not functional.
    """
    if not isinstance(model, keras.Model) or not hasattr(model, "_inbound_nodes") or not getattr(model, "inputs", None):
        raise ValueError(f"Expected a functional Keras model. Received: model={type(model).__name__}")
    quantized = [layer for layer in model.layers if isinstance(layer, qlayers._QuantizedWeightsMixin)]
    if not quantized:
        return model

    def plain(layer):
        if isinstance(layer, qlayers._QuantizedWeightsMixin):
            return layer._keras_base.from_config(_plain_config(layer))
        return layer.__class__.from_config(layer.get_config())

    inputs = models.inputs_of(model)
    outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs  # the model's own output structure
    clone = keras.models.clone_model(keras.Model(inputs, outputs, name=model.name), clone_function=plain)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        target = clone.get_layer(layer.name)
        if isinstance(layer, qlayers._QuantizedWeightsMixin):
            weights = qlayers.quantized_weights(layer)
            target.set_weights([weights[k] for k in ("kernel", "bias") if k in weights])
        elif layer.weights:
            target.set_weights(layer.get_weights())
    return clone


def distinct_values_per_channel(model):
    """Largest number of distinct values in one output channel of each kernel.

    Args:
        model: a (folded) Keras model.

    Returns:
        A dict from layer name to that count, for layers with a kernel.
    """
    counts = {}
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        kernel = keras.ops.convert_to_numpy(kernel)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel = kernel.reshape(kernel.shape[0], kernel.shape[1], -1)
        channels = kernel.reshape(-1, kernel.shape[-1])
        counts[layer.name] = max(len(np.unique(channels[:, c])) for c in range(channels.shape[1]))
    return counts
