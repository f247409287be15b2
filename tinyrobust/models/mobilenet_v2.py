"""MobileNetV2 for small images: a compact student for distillation."""

import keras

from tinyrobust.models._builder import LayerBuilder

# (expansion, output channels, repeats, first stride) for 32x32 inputs: CIFAR-style strides.
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _channels(value, alpha):
    """`value * alpha` rounded to a multiple of 8 (at least 8), as in MobileNetV2."""
    scaled = max(8, int(value * alpha + 4) // 8 * 8)
    return scaled + 8 if scaled < 0.9 * value * alpha else scaled


def mobilenet_v2(num_classes=10, quantization="float", input_shape=(32, 32, 3), alpha=1.0, name=None):
    """MobileNetV2 (inverted residual blocks) with CIFAR-style strides.

    Args:
        num_classes: number of logits.
        quantization: quantization preset name ("float", "int8", "int4", "stb", "stq").
        input_shape: shape of one input.
        alpha: width multiplier (e.g. 0.35, 0.5, 1.0).
        name: model name; defaults to `mobilenet_v2_<alpha>_<quantization>`.

    Returns:
        A functional `keras.Model` mapping inputs in [0, 1] to logits. Layers
        are named `conv_1`, `block_<i>_expand|depthwise|project`,
        `block_<i>_relu_1/2`, `conv_last`, `relu_last`, `pool`, `logits`.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"Expected `alpha` to be a positive number. Received: alpha={alpha!r}")
    build = LayerBuilder(quantization)
    inputs = keras.Input(input_shape, name="input")
    h = build.conv(_channels(32, alpha), 3, padding="same", use_bias=False, name="conv_1", edge=True)(inputs)
    h = keras.layers.BatchNormalization(name="bn_1")(h)
    h = build.relu("relu_1")(h)
    block = 0
    for expansion, channels, repeats, first_stride in _BLOCKS:
        out_channels = _channels(channels, alpha)
        for repeat in range(repeats):
            block += 1
            stride = first_stride if repeat == 0 else 1
            in_channels = h.shape[-1]
            y = h
            if expansion != 1:
                y = build.conv(in_channels * expansion, 1, use_bias=False, name=f"block_{block}_expand")(y)
                y = keras.layers.BatchNormalization(name=f"block_{block}_bn_expand")(y)
                y = build.relu(f"block_{block}_relu_1")(y)
            y = build.depthwise(3, strides=stride, padding="same", use_bias=False, name=f"block_{block}_depthwise")(y)
            y = keras.layers.BatchNormalization(name=f"block_{block}_bn_depthwise")(y)
            y = build.relu(f"block_{block}_relu_2")(y)
            y = build.conv(out_channels, 1, use_bias=False, name=f"block_{block}_project")(y)
            y = keras.layers.BatchNormalization(name=f"block_{block}_bn_project")(y)
            h = keras.layers.Add(name=f"block_{block}_add")([h, y]) if stride == 1 and in_channels == out_channels else y
    h = build.conv(_channels(1280, max(alpha, 1.0)), 1, use_bias=False, name="conv_last")(h)
    h = keras.layers.BatchNormalization(name="bn_last")(h)
    h = build.relu("relu_last")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = build.dense(num_classes, name="logits", edge=True)(h)
    return keras.Model(inputs, outputs, name=name or f"mobilenet_v2_{alpha:g}_{build.preset.name}")
