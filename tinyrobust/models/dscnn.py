"""MLPerf Tiny keyword spotting model: DS-CNN for 49x10 MFCC inputs."""

import keras

from tinyrobust.models._builder import LayerBuilder


def dscnn(num_classes=12, quantization="float", input_shape=(49, 10, 1), filters=64, name=None):
    """The MLPerf Tiny DS-CNN (64 filters, 10x4 stride-2 stem, 4 depthwise-separable blocks; 24,908 parameters).

    Args:
        num_classes: number of logits.
        quantization: quantization preset name ("float", "int8", "int4", "stb", "stq").
        input_shape: shape of one MFCC input.
        filters: channels of every block (64 in MLPerf Tiny).
        name: model name; defaults to `dscnn_<quantization>`.

    Returns:
        A functional `keras.Model` mapping MFCCs to logits. Layers are named
        `conv_1` (stem), `block_<i>_depthwise`, `block_<i>_pointwise`,
        `block_<i>_relu_1/2`, `pool`, `logits`.
    """
    if not isinstance(filters, int) or filters <= 0:
        raise ValueError(f"Expected `filters` to be a positive integer. Received: filters={filters!r}")
    build = LayerBuilder(quantization)
    regularizer = keras.regularizers.L2(1e-4)
    inputs = keras.Input(input_shape, name="input")
    h = build.conv(filters, (10, 4), strides=(2, 2), padding="same", kernel_regularizer=regularizer,
                   name="conv_1", edge=True)(inputs)
    h = keras.layers.BatchNormalization(name="bn_1")(h)
    h = build.relu("relu_1")(h)
    h = keras.layers.Dropout(0.2, name="dropout_1")(h)
    for block in range(1, 5):
        h = build.depthwise((3, 3), padding="same", depthwise_regularizer=regularizer,
                            name=f"block_{block}_depthwise")(h)
        h = keras.layers.BatchNormalization(name=f"block_{block}_bn_1")(h)
        h = build.relu(f"block_{block}_relu_1")(h)
        h = build.conv(filters, (1, 1), padding="same", kernel_regularizer=regularizer,
                       name=f"block_{block}_pointwise")(h)
        h = keras.layers.BatchNormalization(name=f"block_{block}_bn_2")(h)
        h = build.relu(f"block_{block}_relu_2")(h)
    h = keras.layers.Dropout(0.4, name="dropout_2")(h)
    h = keras.layers.AveragePooling2D(pool_size=h.shape[1:3], name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    outputs = build.dense(num_classes, name="logits", edge=True)(h)
    return keras.Model(inputs, outputs, name=name or f"dscnn_{build.preset.name}")
