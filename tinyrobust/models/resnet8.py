"""MLPerf Tiny image classification model: ResNet-8 for 32x32x3 inputs."""

import keras

from tinyrobust.models._builder import LayerBuilder


def resnet8(num_classes=10, quantization="float", input_shape=(32, 32, 3), name=None):
    """The MLPerf Tiny ResNet-8 (16/32/64 filters, 3 residual stacks; 78,666 float parameters).

    Args:
        num_classes: number of logits.
        quantization: quantization preset name ("float", "int8", "int4", "stb", "stq").
        input_shape: shape of one input.
        name: model name; defaults to `resnet8_<quantization>`.

    Returns:
        A functional `keras.Model` mapping inputs in [0, 1] to logits. Layers are
        named `conv_1` (stem), `stack_<i>_conv_<j>`, `stack_<i>_shortcut`,
        `stack_<i>_relu_<j>`, `pool`, `logits`.
    """
    build = LayerBuilder(quantization)
    regularizer = keras.regularizers.L2(1e-4)
    conv_args = dict(padding="same", kernel_initializer="he_normal", kernel_regularizer=regularizer)
    inputs = keras.Input(input_shape, name="input")
    h = build.conv(16, 3, name="conv_1", edge=True, **conv_args)(inputs)
    h = keras.layers.BatchNormalization(name="bn_1")(h)
    h = build.relu("relu_1")(h)
    for stack, filters in enumerate([16, 32, 64], start=1):
        strides = 1 if stack == 1 else 2
        y = build.conv(filters, 3, strides=strides, name=f"stack_{stack}_conv_1", **conv_args)(h)
        y = keras.layers.BatchNormalization(name=f"stack_{stack}_bn_1")(y)
        y = build.relu(f"stack_{stack}_relu_1")(y)
        y = build.conv(filters, 3, name=f"stack_{stack}_conv_2", **conv_args)(y)
        y = keras.layers.BatchNormalization(name=f"stack_{stack}_bn_2")(y)
        if stack > 1:
            h = build.conv(filters, 1, strides=strides, name=f"stack_{stack}_shortcut", **conv_args)(h)
        h = keras.layers.Add(name=f"stack_{stack}_add")([h, y])
        h = build.relu(f"stack_{stack}_relu_2")(h)
    h = keras.layers.AveragePooling2D(pool_size=h.shape[1:3], name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    outputs = build.dense(num_classes, name="logits", edge=True)(h)
    return keras.Model(inputs, outputs, name=name or f"resnet8_{build.preset.name}")
