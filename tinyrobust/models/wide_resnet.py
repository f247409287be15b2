"""Wide ResNet (Zagoruyko & Komodakis 2016): a robust teacher for distillation."""

import keras

from tinyrobust.models._builder import LayerBuilder


def wide_resnet(depth=16, width=4, num_classes=10, quantization="float", input_shape=(32, 32, 3), name=None):
    """WRN-depth-width with pre-activation basic blocks.

    Args:
        depth: total depth; `(depth - 4)` must be divisible by 6.
        width: widening factor of the 16/32/64-channel groups.
        num_classes: number of logits.
        quantization: quantization preset name ("float", "int8", "int4", "stb", "stq").
        input_shape: shape of one input.
        name: model name; defaults to `wrn_<depth>_<width>_<quantization>`.

    Returns:
        A functional `keras.Model` mapping inputs in [0, 1] to logits. Layers
        are named `conv_1`, `group_<g>_block_<b>_conv_<j>`,
        `group_<g>_block_<b>_relu_<j>`, `group_<g>_block_1_shortcut`,
        `relu_last`, `pool`, `logits`.
    """
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"Expected `depth` to be 6n + 4 with n >= 1 (10, 16, 22, 28, ...). Received: depth={depth!r}")
    if not isinstance(width, int) or width <= 0:
        raise ValueError(f"Expected `width` to be a positive integer. Received: width={width!r}")
    blocks = (depth - 4) // 6
    build = LayerBuilder(quantization)
    inputs = keras.Input(input_shape, name="input")
    h = build.conv(16, 3, padding="same", use_bias=False, name="conv_1", edge=True)(inputs)
    for group, channels in enumerate([16 * width, 32 * width, 64 * width], start=1):
        for block in range(1, blocks + 1):
            prefix = f"group_{group}_block_{block}"
            stride = 2 if group > 1 and block == 1 else 1
            y = keras.layers.BatchNormalization(name=f"{prefix}_bn_1")(h)
            y = build.relu(f"{prefix}_relu_1")(y)
            shortcut = h
            if h.shape[-1] != channels or stride != 1:
                shortcut = build.conv(channels, 1, strides=stride, use_bias=False, name=f"{prefix}_shortcut")(y)
            y = build.conv(channels, 3, strides=stride, padding="same", use_bias=False, name=f"{prefix}_conv_1")(y)
            y = keras.layers.BatchNormalization(name=f"{prefix}_bn_2")(y)
            y = build.relu(f"{prefix}_relu_2")(y)
            y = build.conv(channels, 3, padding="same", use_bias=False, name=f"{prefix}_conv_2")(y)
            h = keras.layers.Add(name=f"{prefix}_add")([shortcut, y])
    h = keras.layers.BatchNormalization(name="bn_last")(h)
    h = build.relu("relu_last")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = build.dense(num_classes, name="logits", edge=True)(h)
    return keras.Model(inputs, outputs, name=name or f"wrn_{depth}_{width}_{build.preset.name}")
