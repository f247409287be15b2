"""A small CNN for 28x28x1 inputs (Fashion-MNIST)."""

import keras

from tinyrobust.models._builder import LayerBuilder


def small_cnn(num_classes=10, quantization="float", input_shape=(28, 28, 1), width=16, name=None):
    """Three conv blocks (width, 2*width, 4*width; strides 1, 2, 2), pooling, logits.

    Args:
        num_classes: number of logits.
        quantization: quantization preset name ("float", "int8", "int4", "stb", "stq").
        input_shape: shape of one input.
        width: filters of the first block.
        name: model name; defaults to `small_cnn_<quantization>`.

    Returns:
        A functional `keras.Model` mapping inputs in [0, 1] to logits. Layers are
        named `conv_1..3`, `bn_1..3`, `relu_1..3`, `pool`, `logits`.
    """
    if not isinstance(width, int) or width <= 0:
        raise ValueError(f"Expected `width` to be a positive integer. Received: width={width!r}")
    build = LayerBuilder(quantization)
    inputs = keras.Input(input_shape, name="input")
    h = inputs
    for i, (filters, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2)], start=1):
        h = build.conv(filters, 3, strides=stride, padding="same", use_bias=False, name=f"conv_{i}", edge=i == 1)(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"bn_{i}")(h)
        h = build.relu(f"relu_{i}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = build.dense(num_classes, name="logits", edge=True)(h)
    return keras.Model(inputs, outputs, name=name or f"small_cnn_{build.preset.name}")
