"""Weight and activation quantizers.

Every quantizer is a small Keras layer: it may own state (a `SeedGenerator` for
its noise, a `stochasticity` variable a callback can anneal), it is saved with
the model, and it receives `training` explicitly from the layer that uses it.
Quantizers return values on their quantization grid in the forward pass and a
straight-through gradient in the backward pass.

Accepted everywhere a quantizer is expected (see `get`):
- an alias string: `"stochastic_ternary"` (or `"stq"`), `"ternary"`,
  `"stochastic_binary"` (or `"stb"`), `"int8"`, `"int4"`, `"relu_int8"`,
  `"relu_int4"`, or a class name in snake case;
- a quantizer instance;
- a config dict as produced by `keras.saving.serialize_keras_object`.

`preset(name)` gives the kernel, bias and activation quantizers of the
quantization schemes the models are built with: `"float"`, `"int8"`, `"int4"`,
`"stb"`, `"stq"`.
"""

import dataclasses

import keras
import qkeras
from keras import ops

from tinyrobust.validation import check_number

__all__ = [
    "Quantizer",
    "StochasticTernary",
    "Ternary",
    "StochasticBinary",
    "QuantizedBits",
    "QuantizedReLU",
    "Preset",
    "PRESETS",
    "get",
    "serialize",
    "deserialize",
    "preset",
    "stochastic_quantizers",
]

_EPS = 1e-8
_SCALE_ITERATIONS = 5


def _serializable(cls):
    return keras.saving.register_keras_serializable(package="tinyrobust")(cls)


def _check_alpha(alpha):
    if isinstance(alpha, str):
        if alpha in ("auto", "auto_po2"):
            return alpha
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0:
        return float(alpha)
    raise ValueError(
        "Expected `alpha` to be 'auto', 'auto_po2' or a positive number. "
        f"Received: alpha={alpha!r}"
    )


def _check_bits(bits, integer):
    check_number("bits", bits, low=2, high=16, integer=True)
    check_number("integer", integer, low=0, high=bits, high_open=True, integer=True)


def _reduce_axes(rank, channel_axes):
    """Axes to reduce over so that one scale remains per channel."""
    if rank <= 1:
        return None
    keep = {a % rank for a in channel_axes}
    return tuple(a for a in range(rank) if a not in keep)


def _power_of_two(scale):
    return ops.power(2.0, ops.round(ops.log(scale + _EPS) / ops.log(2.0)))


def _straight_through(x, lower, upper, quantized):
    """`quantized` forward, gradient of `clip(x, lower, upper)` backward."""
    clipped = ops.minimum(ops.maximum(x, lower), upper)
    # `clipped - stop_gradient(clipped)` is exactly 0, so the forward value is
    # exactly `quantized` (no round-off off the grid).
    return ops.stop_gradient(quantized) + (clipped - ops.stop_gradient(clipped))


class Quantizer(keras.layers.Layer):
    """Base class of tinyrobust quantizers.

    Subclasses implement `call(inputs, training=None, channel_axes=(-1,))` and
    set `precision`, the number of bits a quantized value needs.

    Args:
        **kwargs: base layer arguments (`name`, `dtype`).
    """

    precision = 32
    stochastic = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def compute_output_shape(self, input_shape):
        return input_shape


class _ScaledQuantizer(Quantizer):
    """Shared machinery of the binary and ternary quantizers."""

    def __init__(self, alpha="auto", stochasticity=1.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.alpha = _check_alpha(alpha)
        self.initial_stochasticity = float(check_number("stochasticity", stochasticity, low=0, high=1))
        if seed is not None:
            check_number("seed", seed, integer=True)
        self.seed = seed
        if self.stochastic:
            self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")

    def build(self, input_shape=None):
        if self.stochastic:
            # A variable, so that a callback can anneal it inside a compiled `fit`.
            self.stochasticity = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(self.initial_stochasticity),
                trainable=False,
                name="stochasticity",
            )
        self.built = True

    def scale(self, x, channel_axes=(-1,)):
        """Returns the quantization scale `alpha`, broadcastable against `x`.

        Args:
            x: the tensor to quantize.
            channel_axes: axes that keep one scale each ("per channel").

        Returns:
            A tensor of scales, without gradient.
        """
        if not isinstance(self.alpha, str):
            return ops.convert_to_tensor(self.alpha, dtype=x.dtype)
        axes = _reduce_axes(len(x.shape), channel_axes)
        scale = ops.stop_gradient(self._auto_scale(ops.stop_gradient(x), axes))
        if self.alpha == "auto_po2":
            scale = _power_of_two(scale)
        return scale

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, stochasticity=self.initial_stochasticity, seed=self.seed)
        return config

    def _stochastic(self, training):
        return bool(training) and self.stochastic


@_serializable
class StochasticTernary(_ScaledQuantizer):
    """Stochastic ternary quantizer (STQ): values in {-alpha, 0, +alpha}.

    With `training=True` each value `x` is rounded at random between the two
    ternary levels around `clip(x, -alpha, alpha)` so that the expectation of
    the output equals the clipped input (with `stochasticity=1`). Otherwise it
    is the deterministic ternary: `alpha * sign(x)` where `|x| > threshold *
    alpha`, else 0. The gradient is straight-through on `[-alpha, alpha]`.

    `alpha="auto"` is qkeras' per-channel scale: start from `2/3 max|x|` and
    alternate a few times between thresholding and the least-squares scale.

    Args:
        threshold: fraction of `alpha` below which a value rounds to 0 at
            inference, in (0, 1).
        alpha: `"auto"`, `"auto_po2"` (power of two) or a fixed positive scale.
        stochasticity: in [0, 1]; 1 is unbiased stochastic rounding, 0 is the
            deterministic ternary even in training. A variable at run time:
            `tinyrobust.callbacks.QuantizationNoiseScheduler` anneals it.
        seed: integer seed of the noise, or None.
        **kwargs: base layer arguments.
    """

    precision = 2
    stochastic = True

    def __init__(self, threshold=0.33, alpha="auto", stochasticity=1.0, seed=None, **kwargs):
        self.threshold = float(check_number("threshold", threshold, low=0, high=1, low_open=True, high_open=True))
        super().__init__(alpha=alpha, stochasticity=stochasticity, seed=seed, **kwargs)

    def _auto_scale(self, x, axes):
        magnitude = ops.abs(x)
        scale = 2.0 * ops.max(magnitude, axis=axes, keepdims=True) / 3.0
        for _ in range(_SCALE_ITERATIONS):
            nonzero = ops.cast(magnitude > self.threshold * scale, x.dtype)
            total = ops.sum(nonzero, axis=axes, keepdims=True)
            lsq = ops.sum(magnitude * nonzero, axis=axes, keepdims=True) / ops.maximum(total, 1.0)
            scale = ops.where(total > 0, lsq, scale)
        return ops.maximum(scale, _EPS)

    def call(self, inputs, training=None, channel_axes=(-1,)):
        x = ops.convert_to_tensor(inputs)
        alpha = self.scale(x, channel_axes)
        ratio = ops.clip(x / alpha, -1.0, 1.0)
        magnitude = ops.abs(ratio)
        hard = ops.cast(magnitude > self.threshold, x.dtype)
        if self._stochastic(training):
            s = ops.cast(self.stochasticity, x.dtype)
            probability = s * magnitude + (1.0 - s) * hard
            draw = keras.random.uniform(ops.shape(x), dtype=x.dtype, seed=self.seed_generator)
            nonzero = ops.cast(draw < probability, x.dtype)
        else:
            nonzero = hard
        quantized = alpha * ops.sign(ratio) * nonzero
        return _straight_through(x, -alpha, alpha, quantized)

    def get_config(self):
        config = super().get_config()
        config["threshold"] = self.threshold
        return config


@_serializable
class Ternary(StochasticTernary):
    """Deterministic ternary quantizer: `StochasticTernary` at inference.

    Args:
        threshold: fraction of `alpha` below which a value rounds to 0, in (0, 1).
        alpha: `"auto"`, `"auto_po2"` or a fixed positive scale.
        **kwargs: base layer arguments.
    """

    stochastic = False

    def __init__(self, threshold=0.33, alpha="auto", **kwargs):
        kwargs.pop("stochasticity", None)
        kwargs.pop("seed", None)
        super().__init__(threshold=threshold, alpha=alpha, **kwargs)

    def get_config(self):
        config = super().get_config()
        del config["stochasticity"], config["seed"]
        return config


@_serializable
class StochasticBinary(_ScaledQuantizer):
    """Stochastic binary quantizer (STB): values in {-alpha, +alpha}.

    With `training=True`, `+alpha` is drawn with probability
    `(1 + clip(x / alpha, -1, 1)) / 2`, so the expectation equals the clipped
    input; otherwise `alpha * sign(x)` (0 maps to `+alpha`). `alpha="auto"` is
    the per-channel mean of `|x|` (XNOR-Net). Straight-through gradient on
    `[-alpha, alpha]`.

    Args:
        alpha: `"auto"`, `"auto_po2"` or a fixed positive scale.
        stochasticity: in [0, 1]; 0 is deterministic even in training.
        seed: integer seed of the noise, or None.
        **kwargs: base layer arguments.
    """

    precision = 1
    stochastic = True

    def _auto_scale(self, x, axes):
        return ops.maximum(ops.mean(ops.abs(x), axis=axes, keepdims=True), _EPS)

    def call(self, inputs, training=None, channel_axes=(-1,)):
        x = ops.convert_to_tensor(inputs)
        alpha = self.scale(x, channel_axes)
        ratio = ops.clip(x / alpha, -1.0, 1.0)
        hard = ops.cast(ratio >= 0, x.dtype)
        if self._stochastic(training):
            s = ops.cast(self.stochasticity, x.dtype)
            probability = s * (1.0 + ratio) / 2.0 + (1.0 - s) * hard
            draw = keras.random.uniform(ops.shape(x), dtype=x.dtype, seed=self.seed_generator)
            positive = ops.cast(draw < probability, x.dtype)
        else:
            positive = hard
        quantized = alpha * (2.0 * positive - 1.0)
        return _straight_through(x, -alpha, alpha, quantized)


@_serializable
class QuantizedBits(Quantizer):
    """Signed fixed-point quantizer: qkeras' `quantized_bits`.

    Values are on a grid of `2**-(bits - 1 - integer)` within
    `[-2**integer, 2**integer)` (symmetric by default), times `alpha` when
    given. Straight-through gradient.

    Args:
        bits: total bits including the sign, in [2, 16].
        integer: bits left of the binary point, in [0, bits).
        symmetric: whether the grid is symmetric around 0.
        alpha: None (scale 1), `"auto"`, `"auto_po2"` or a positive number.
        **kwargs: base layer arguments.
    """

    def __init__(self, bits=8, integer=0, symmetric=True, alpha=None, **kwargs):
        super().__init__(**kwargs)
        _check_bits(bits, integer)
        self.bits, self.integer, self.symmetric = bits, integer, bool(symmetric)
        self.alpha = None if alpha is None else _check_alpha(alpha)
        self._quantizer = qkeras.quantized_bits(
            bits=bits, integer=integer, symmetric=int(self.symmetric), keep_negative=True,
            alpha=self.alpha,
        )

    @property
    def precision(self):
        return self.bits

    def call(self, inputs, training=None, channel_axes=(-1,)):
        return self._quantizer(ops.convert_to_tensor(inputs))

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, integer=self.integer, symmetric=self.symmetric, alpha=self.alpha)
        return config


@ops.custom_gradient
def _quantized_relu(x, scale, top_level):
    """`clip(round(x * scale), 0, top_level) / scale` with the straight-through gradient 1 on (0, top_level / scale]."""
    y = ops.clip(ops.round(x * scale), 0.0, top_level) / scale

    def grad(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        inside = ops.logical_and(x > 0.0, x <= top_level / scale)
        return ops.where(inside, upstream, 0.0), None, None

    return y, grad


@_serializable
class QuantizedReLU(Quantizer):
    """Unsigned fixed-point ReLU: qkeras' `quantized_relu`.

    Outputs `relu(x)` rounded to a grid of `2**-(bits - integer)` within
    `[0, 2**integer)`. Straight-through gradient.

    Args:
        bits: total bits, in [2, 16].
        integer: bits left of the binary point, in [0, bits).
        **kwargs: base layer arguments.
    """

    def __init__(self, bits=8, integer=0, **kwargs):
        super().__init__(**kwargs)
        _check_bits(bits, integer)
        self.bits, self.integer = bits, integer

    @property
    def precision(self):
        return self.bits

    @property
    def max_value(self):
        """The largest representable output."""
        return 2.0**self.integer - 2.0 ** (self.integer - self.bits)

    def call(self, inputs, training=None, channel_axes=(-1,)):
        # qkeras' quantized_relu in eight elementwise ops instead of about fifteen, with the same values bit for
        # bit (scaling by powers of two is exact, and so are its round-through and straight-through differences)
        # and the same straight-through gradient (1 on (0, max], else 0). Tested against qkeras. Only where
        # x * 2**(bits - integer) overflows float32 do they differ: qkeras gives NaN (inf - inf), this the clip.
        return _quantized_relu(ops.cast(inputs, "float32"), 2.0 ** (self.bits - self.integer), 2.0**self.bits - 1.0)

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, integer=self.integer)
        return config


_ALIASES = {
    "stochastic_ternary": lambda: StochasticTernary(),
    "stq": lambda: StochasticTernary(),
    "ternary": lambda: Ternary(),
    "stochastic_binary": lambda: StochasticBinary(),
    "stb": lambda: StochasticBinary(),
    "quantized_bits": lambda: QuantizedBits(),
    "int8": lambda: QuantizedBits(bits=8),
    "int4": lambda: QuantizedBits(bits=4),
    "quantized_relu": lambda: QuantizedReLU(),
    "relu_int8": lambda: QuantizedReLU(bits=8, integer=3),
    "relu_int4": lambda: QuantizedReLU(bits=4, integer=2),
}


def serialize(quantizer):
    """Returns the config dict of a quantizer (None stays None)."""
    return None if quantizer is None else keras.saving.serialize_keras_object(quantizer)


def deserialize(config):
    """Builds a quantizer from a config dict made by `serialize`."""
    quantizer = keras.saving.deserialize_keras_object(config)
    if not isinstance(quantizer, Quantizer):
        raise ValueError(f"The config does not describe a tinyrobust quantizer. Received: config={config!r}")
    return quantizer


def get(identifier):
    """Resolves a quantizer from an alias, an instance or a config dict.

    Args:
        identifier: None, an alias string (see the module docstring), a
            `Quantizer` instance (returned as is) or a config dict.

    Returns:
        A `Quantizer`, or None for None.

    Raises:
        ValueError: the identifier is none of those.
    """
    if identifier is None or isinstance(identifier, Quantizer):
        return identifier
    if isinstance(identifier, str):
        if identifier not in _ALIASES:
            raise ValueError(
                f"Unknown quantizer alias. Expected one of {sorted(_ALIASES)}. "
                f"Received: identifier={identifier!r}"
            )
        return _ALIASES[identifier]()
    if isinstance(identifier, dict):
        return deserialize(identifier)
    raise ValueError(
        "Could not interpret a quantizer: expected an alias, a Quantizer or a config dict. "
        f"Received: identifier={identifier!r}"
    )


@dataclasses.dataclass(frozen=True)
class Preset:
    """A quantization scheme: which quantizer goes where in a model.

    Each field is an identifier accepted by `get` (None means float); the
    methods return a fresh quantizer per call, one per layer.

    Attributes:
        name: the preset's name.
        kernel: quantizer of the hidden layers' kernels.
        bias: quantizer of biases.
        activation: quantizer of hidden activations (applied after ReLU).
        edge_kernel: quantizer of the first and last layers' kernels.
    """

    name: str
    kernel: object = None
    bias: object = None
    activation: object = None
    edge_kernel: object = None

    def kernel_quantizer(self, edge=False):
        """A new kernel quantizer; `edge=True` for the first and last layers."""
        return get(self.edge_kernel if edge else self.kernel)

    def bias_quantizer(self):
        """A new bias quantizer, or None."""
        return get(self.bias)

    def activation_quantizer(self):
        """A new activation quantizer, or None for a float ReLU."""
        return get(self.activation)

    @property
    def is_float(self):
        return self.kernel is None and self.activation is None


PRESETS = {
    "float": Preset("float"),
    "int8": Preset("int8", kernel="int8", bias="int8", activation="relu_int8", edge_kernel="int8"),
    "int4": Preset("int4", kernel="int4", bias="int8", activation="relu_int4", edge_kernel="int8"),
    "stb": Preset("stb", kernel="stb", bias="int8", activation="relu_int8", edge_kernel="int8"),
    "stq": Preset("stq", kernel="stq", bias="int8", activation="relu_int8", edge_kernel="int8"),
}


def preset(name):
    """Returns the `Preset` called `name` (one of `PRESETS`), or `name` if a Preset.

    Raises:
        ValueError: unknown name.
    """
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(
            f"Unknown quantization preset. Expected one of {sorted(PRESETS)}. Received: quantization={name!r}"
        )
    return PRESETS[name]


def stochastic_quantizers(model):
    """The built stochastic quantizers (STQ, STB) anywhere inside `model`.

    Args:
        model: a Keras model or layer.

    Returns:
        A list of `Quantizer` layers whose `stochastic` is True.
    """
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, Quantizer) and layer.stochastic and layer.built]
