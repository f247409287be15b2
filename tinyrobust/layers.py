"""Quantized Keras layers.

Drop-in replacements for `keras.layers.Conv2D`, `DepthwiseConv2D` and `Dense`
with the same constructor arguments plus quantizers, and `QActivation`. They
subclass qkeras-v3's layers, so qkeras tooling recognises them, but unlike
qkeras they pass `training` to their quantizers: stochastic quantizers are
stochastic inside `model.fit` and deterministic in `predict` and `evaluate`.

Quantizers are given as an alias, an instance or a config dict (see
`tinyrobust.quantizers.get`).
"""

import keras
import qkeras
from keras import ops

from tinyrobust import quantizers as quantizers_lib

__all__ = ["QConv2D", "QDepthwiseConv2D", "QDense", "QActivation", "quantized_weights"]


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="tinyrobust")(cls)


def _layer_from_config(cls, config):
    """Keras' `Layer.from_config`, skipping qkeras' override."""
    return keras.layers.Layer.from_config.__func__(cls, config)


class _QuantizedWeightsMixin:
    """Quantizer bookkeeping shared by the kernel layers.

    `_quantizer_names` maps the weight attribute ("kernel", "bias") to the
    constructor argument that configures its quantizer.
    """

    _quantizer_names = {"kernel": "kernel_quantizer", "bias": "bias_quantizer"}
    _channel_axes = (-1,)
    _keras_base = None  # the Keras layer whose build and config the quantized layer keeps

    def build(self, input_shape):
        self._keras_base.build(self, input_shape)
        self._build_quantizers()

    def get_config(self):
        # Keras' config, not qkeras' (which adds arguments the signature lacks).
        return {**self._keras_base.get_config(self), **self._quantizer_config()}

    @classmethod
    def from_config(cls, config):
        return _layer_from_config(cls, config)

    def _init_quantizers(self, **quantizers):
        for weight, argument in self._quantizer_names.items():
            quantizer = quantizers_lib.get(quantizers[argument])
            setattr(self, argument, quantizer)
            # The attribute names qkeras' own utilities read.
            setattr(self, argument + "_internal", quantizer)
        self.quantizers = [getattr(self, a) for a in self._quantizer_names.values()]
        self.kernel_range = self.bias_range = self._mask = None

    def _build_quantizers(self):
        for weight, argument in self._quantizer_names.items():
            quantizer = getattr(self, argument)
            variable = getattr(self, weight, None)
            if quantizer is not None and variable is not None and not quantizer.built:
                quantizer.build(variable.shape)

    def quantized(self, weight, training=None):
        """Returns the weight called `weight` as the layer uses it.

        Args:
            weight: "kernel" or "bias".
            training: whether stochastic quantizers draw noise.

        Returns:
            The quantized tensor (the float variable when there is no quantizer).
        """
        variable = getattr(self, weight)
        quantizer = getattr(self, self._quantizer_names[weight])
        if quantizer is None:
            return variable
        axes = self._channel_axes if weight == "kernel" else (-1,)
        return quantizer(variable, training=training, channel_axes=axes)

    def _add_bias_and_activate(self, outputs, training):
        if self.use_bias:
            bias = self.quantized("bias", training)
            if getattr(self, "data_format", None) == "channels_first" and len(outputs.shape) > 2:
                bias = ops.reshape(bias, (1, -1) + (1,) * (len(outputs.shape) - 2))
            outputs = outputs + bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _quantizer_config(self):
        return {a: quantizers_lib.serialize(getattr(self, a)) for a in self._quantizer_names.values()}


@_serializable
class QConv2D(_QuantizedWeightsMixin, qkeras.QConv2D):
    """2D convolution with quantized kernel and bias.

    Takes every argument of `keras.layers.Conv2D`, plus:

    Args:
        kernel_quantizer: quantizer of the kernel (alias, instance, dict or None).
        bias_quantizer: quantizer of the bias.
    """

    _keras_base = keras.layers.Conv2D

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        kernel_quantizer=None,
        bias_quantizer=None,
        **kwargs,
    ):
        # qkeras' constructor changes Keras' defaults and adds clipping
        # constraints; use Keras' own so the signature means what Keras says.
        keras.layers.Conv2D.__init__(
            self, filters, kernel_size, strides=strides, padding=padding, data_format=data_format,
            dilation_rate=dilation_rate, groups=groups, activation=activation, use_bias=use_bias,
            kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer, kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint, **kwargs,
        )
        self._init_quantizers(kernel_quantizer=kernel_quantizer, bias_quantizer=bias_quantizer)

    def call(self, inputs, training=None):
        outputs = self.convolution_op(inputs, self.quantized("kernel", training))
        return self._add_bias_and_activate(outputs, training)


@_serializable
class QDepthwiseConv2D(_QuantizedWeightsMixin, qkeras.QDepthwiseConv2D):
    """Depthwise 2D convolution with quantized kernel and bias.

    Takes every argument of `keras.layers.DepthwiseConv2D`, plus:

    Args:
        depthwise_quantizer: quantizer of the depthwise kernel; its per-channel
            scale is per (input channel, multiplier) pair.
        bias_quantizer: quantizer of the bias.
    """

    _quantizer_names = {"kernel": "depthwise_quantizer", "bias": "bias_quantizer"}
    _channel_axes = (-2, -1)
    _keras_base = keras.layers.DepthwiseConv2D

    def __init__(
        self,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        depth_multiplier=1,
        data_format=None,
        dilation_rate=(1, 1),
        activation=None,
        use_bias=True,
        depthwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        depthwise_constraint=None,
        bias_constraint=None,
        depthwise_quantizer=None,
        bias_quantizer=None,
        **kwargs,
    ):
        keras.layers.DepthwiseConv2D.__init__(
            self, kernel_size, strides=strides, padding=padding, depth_multiplier=depth_multiplier,
            data_format=data_format, dilation_rate=dilation_rate, activation=activation,
            use_bias=use_bias, depthwise_initializer=depthwise_initializer,
            bias_initializer=bias_initializer, depthwise_regularizer=depthwise_regularizer,
            bias_regularizer=bias_regularizer, activity_regularizer=activity_regularizer,
            depthwise_constraint=depthwise_constraint, bias_constraint=bias_constraint, **kwargs,
        )
        self._init_quantizers(depthwise_quantizer=depthwise_quantizer, bias_quantizer=bias_quantizer)

    def call(self, inputs, training=None):
        outputs = ops.depthwise_conv(
            inputs, self.quantized("kernel", training), strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format=self.data_format,
        )
        return self._add_bias_and_activate(outputs, training)


@_serializable
class QDense(_QuantizedWeightsMixin, qkeras.QDense):
    """Densely connected layer with quantized kernel and bias.

    Takes every argument of `keras.layers.Dense`, plus:

    Args:
        kernel_quantizer: quantizer of the kernel (per output unit scale).
        bias_quantizer: quantizer of the bias.
    """

    _keras_base = keras.layers.Dense

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        kernel_quantizer=None,
        bias_quantizer=None,
        **kwargs,
    ):
        keras.layers.Dense.__init__(
            self, units, activation=activation, use_bias=use_bias,
            kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer, kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint, lora_rank=lora_rank, lora_alpha=lora_alpha,
            quantization_config=quantization_config, **kwargs,
        )
        self._init_quantizers(kernel_quantizer=kernel_quantizer, bias_quantizer=bias_quantizer)

    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, self.quantized("kernel", training))
        return self._add_bias_and_activate(outputs, training)


@_serializable
class QActivation(qkeras.QActivation):
    """Applies a quantizer (e.g. `"relu_int8"`) or a Keras activation.

    Args:
        activation: a tinyrobust quantizer (alias, instance or dict) or the
            name of a Keras activation (`"relu"`, ...).
        **kwargs: base layer arguments.
    """

    def __init__(self, activation, **kwargs):
        keras.layers.Layer.__init__(self, **kwargs)
        self.supports_masking = True
        try:
            self.quantizer = quantizers_lib.get(activation)
        except ValueError:
            if not isinstance(activation, str):
                raise
            self.quantizer = None
            try:
                keras.activations.get(activation)
            except ValueError:
                raise ValueError(
                    "Expected `activation` to be a quantizer alias, a Quantizer, a config dict or "
                    f"a Keras activation name. Received: activation={activation!r}"
                ) from None
        self.activation = self.quantizer or keras.activations.get(activation)
        self._activation_name = None if self.quantizer is not None else activation

    def build(self, input_shape):
        if self.quantizer is not None and not self.quantizer.built:
            self.quantizer.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        if self.quantizer is not None:
            return self.quantizer(inputs, training=training, channel_axes=())
        return self.activation(inputs)

    def get_config(self):
        config = keras.layers.Layer.get_config(self)
        config["activation"] = self._activation_name or quantizers_lib.serialize(self.quantizer)
        return config

    @classmethod
    def from_config(cls, config):
        return _layer_from_config(cls, config)


def quantized_weights(layer):
    """Deterministic quantized kernel and bias of a layer, as numpy arrays.

    Args:
        layer: a tinyrobust quantized layer, or any layer with `kernel`/`bias`.

    Returns:
        A dict with "kernel" and, when the layer has one, "bias".
    """
    result = {}
    for weight in ("kernel", "bias"):
        if getattr(layer, weight, None) is None:
            continue
        if isinstance(layer, _QuantizedWeightsMixin):
            result[weight] = ops.convert_to_numpy(layer.quantized(weight, training=False))
        else:
            result[weight] = ops.convert_to_numpy(getattr(layer, weight))
    return result
