"""Per-layer footprint of a quantized model: `tinyrobust.summary`."""

import dataclasses

import keras

from tinyrobust import layers as layers_lib

__all__ = ["LayerFootprint", "Footprint", "summary"]

_FLOAT_BITS = 32
_INT8_BIAS_BYTES = 4  # TFLite int8 kernels keep int32 biases.


@dataclasses.dataclass(frozen=True)
class LayerFootprint:
    """Footprint of one layer.

    Attributes:
        name: layer name.
        kind: layer class name.
        params: number of parameters (trainable and not).
        bits: bits per kernel weight (32 for float, 0 for no kernel).
        int8_bytes: weight bytes in the deployed int8 model (int8 kernels,
            int32 biases; batch norm folded into a per-channel int32 bias).
        packed_bytes: weight bytes with ideal packing at the quantizers'
            precision (kernels at `bits`, biases at their quantizer's bits).
        macs: multiply-accumulates of one inference (convolutions, depthwise
            convolutions and dense layers; 0 for the rest).
    """

    name: str
    kind: str
    params: int
    bits: int
    int8_bytes: int
    packed_bytes: int
    macs: int = 0


@dataclasses.dataclass(frozen=True)
class Footprint:
    """A model's footprint: one row per layer with parameters, and totals."""

    layers: tuple

    @property
    def params(self):
        return sum(row.params for row in self.layers)

    @property
    def int8_bytes(self):
        return sum(row.int8_bytes for row in self.layers)

    @property
    def packed_bytes(self):
        return sum(row.packed_bytes for row in self.layers)

    @property
    def macs(self):
        """Multiply-accumulates of one inference, summed over the layers."""
        return sum(row.macs for row in self.layers)

    def __repr__(self):  # what a REPL echoes after `tr.summary(model)` printed the table: one line
        return (f"Footprint({len(self.layers)} layers, {self.params:,} params, {self.int8_bytes / 1024:.2f} KB at "
                f"int8, {self.packed_bytes / 1024:.2f} KB packed, {self.macs:,} MACs)")

    def to_table(self):
        """Returns the footprint as a plain-text table."""
        header = ("layer", "type", "params", "bits", "int8 B", "packed B", "MACs")
        rows = [
            (r.name, r.kind, f"{r.params:,}", str(r.bits or "-"), f"{r.int8_bytes:,}", f"{r.packed_bytes:,.0f}",
             f"{r.macs:,}" if r.macs else "-")
            for r in self.layers
        ]
        rows.append(
            ("total", "", f"{self.params:,}", "", f"{self.int8_bytes / 1024:.2f} KB", f"{self.packed_bytes / 1024:.2f} KB",
             f"{self.macs:,}")
        )
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)

    def to_dict(self):
        return {
            "layers": [dataclasses.asdict(row) for row in self.layers],
            "params": self.params,
            "int8_bytes": self.int8_bytes,
            "packed_bytes": self.packed_bytes,
            "macs": self.macs,
        }


def _bits(quantizer):
    return _FLOAT_BITS if quantizer is None else int(quantizer.precision)


def layer_macs(layer):
    """Multiply-accumulates of one call of a layer with a kernel (convolution, depthwise convolution, dense):
    the kernel's size times the output's spatial positions; 0 for other layers."""
    kernel = getattr(layer, "depthwise_kernel", None)
    kernel = getattr(layer, "kernel", None) if kernel is None else kernel
    if kernel is None:
        return 0
    spatial = [d for d in layer.output.shape[1:-1] if d is not None]
    positions = 1
    for d in spatial:
        positions *= int(d)
    size = 1
    for d in kernel.shape:
        size *= int(d)
    return positions * size


def _layer_footprint(layer):
    params = int(sum(int(w.numpy().size) for w in layer.weights if "stochasticity" not in w.path))
    kind = type(layer).__name__
    kernel = getattr(layer, "kernel", None)
    if isinstance(layer, keras.layers.BatchNormalization):
        channels = int(layer.gamma.shape[0]) if layer.gamma is not None else int(layer.beta.shape[0])
        # Folded into the preceding kernel: one int32 bias per channel remains.
        return LayerFootprint(layer.name, kind, params, 0, channels * _INT8_BIAS_BYTES,
                              channels * _INT8_BIAS_BYTES)
    if kernel is None:
        return LayerFootprint(layer.name, kind, params, 0, 0, 0)
    kernel_size = int(kernel.numpy().size)
    bias = getattr(layer, "bias", None)
    bias_size = 0 if bias is None else int(bias.numpy().size)
    if isinstance(layer, layers_lib._QuantizedWeightsMixin):
        names = layer._quantizer_names
        kernel_bits = _bits(getattr(layer, names["kernel"]))
        bias_bits = _bits(getattr(layer, names["bias"]))
    else:
        kernel_bits = bias_bits = _FLOAT_BITS
    int8 = kernel_size + bias_size * _INT8_BIAS_BYTES
    packed = (kernel_size * kernel_bits + bias_size * bias_bits) / 8
    return LayerFootprint(layer.name, kind, params, kernel_bits, int8, int(round(packed)), layer_macs(layer))


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def summary(model, print_fn=print):
    """Prints and returns the per-layer footprint of a model.

    Args:
        model: a built Keras model (quantized or float).
        print_fn: called with the table; None to print nothing.

    Returns:
        A `Footprint` (rows per layer with parameters; `to_dict()` for JSON).
    """
    if not model.built:
        raise ValueError(f"The model must be built before its footprint is known. Received: model={model.name!r}")
    rows = tuple(_layer_footprint(layer) for layer in _leaf_layers(model) if layer.weights)
    footprint = Footprint(rows)
    if print_fn is not None:
        print_fn(footprint.to_table())
    return footprint
