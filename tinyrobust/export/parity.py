"""Parity of the exported model with the Keras model it came from."""

import dataclasses
import pathlib
import sys

import keras
import numpy as np

from tinyrobust.export.compress import is_compressed
from tinyrobust.export.flatbuffer import uncompressed_path
from tinyrobust.export.interpreter import RUNTIMES, TFLiteModel
from tinyrobust.validation import check_labels


@dataclasses.dataclass
class ParityReport:
    """Keras vs LiteRT vs TFLite Micro on the same inputs.

    Attributes:
        examples: number of inputs compared.
        accuracy: top-1 accuracy per runtime ("keras", "litert", "tflm"), or
            None when no labels were given.
        agreement: top-1 agreement of each TFLite runtime with Keras.
        max_logit_difference: largest |logit difference| of each TFLite runtime
            vs Keras.
        model_bytes: size of the `.tflite` file (the flash it takes).
        arena_bytes: TFLite Micro arena bytes used.
        compressed: whether the file holds `TFLM_DECODE`-compressed weights
            (LiteRT then ran the uncompressed int8 file beside it, which the
            compressed one equals bit for bit in TFLite Micro).
    """

    examples: int
    accuracy: dict
    agreement: dict
    max_logit_difference: dict
    model_bytes: int
    arena_bytes: int
    compressed: bool = False

    def to_dict(self):
        """The report as JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_table(self):
        """The report as a Markdown table."""
        lines = ["| runtime | accuracy | top-1 agreement with Keras | max logit difference |",
                 "| --- | --- | --- | --- |"]
        for runtime in ("keras", "litert", "tflm"):
            accuracy = self.accuracy.get(runtime) if self.accuracy else None
            lines.append(
                f"| {runtime} | {'-' if accuracy is None else f'{accuracy:.4f}'} | "
                f"{self.agreement.get(runtime, 1.0):.4f} | {self.max_logit_difference.get(runtime, 0.0):.4g} |"
            )
        kind = "compressed model (TFLM_DECODE; LiteRT ran its int8 file)" if self.compressed else "Model"
        lines.append(f"\n{kind} {self.model_bytes:,} B, TFLite Micro arena {self.arena_bytes:,} B, "
                     f"{self.examples} examples.")
        return "\n".join(lines)


def _arrays(data):
    if isinstance(data, tuple):
        x, y = data
        return np.asarray(x, np.float32), y
    if hasattr(data, "as_numpy_iterator"):
        xs, ys = [], []
        for batch in data.as_numpy_iterator():
            if isinstance(batch, tuple):
                xs.append(batch[0])
                ys.append(batch[1])
            else:
                xs.append(batch)
        if not xs:
            raise ValueError("Expected `data` to hold at least one example. Received: an empty dataset")
        return np.concatenate(xs).astype(np.float32), np.concatenate(ys) if ys else None
    return np.asarray(data, np.float32), None


def verify(model, tflite_path, data, runtimes=("litert", "tflm"), verbose=False):
    """Compares the Keras model with its export on `data`.

    A compressed file (`to_tflite(..., compress=True)`) runs in TFLite Micro
    as it is; LiteRT, which cannot run `TFLM_DECODE`, runs the uncompressed
    int8 file written beside it.

    Args:
        model: the Keras model that was exported.
        tflite_path: the `.tflite` file (or its bytes).
        data: inputs, an `(x, y)` tuple, or a dataset of `(x, y)` batches; labels of shape (N,) or (N, 1).
        runtimes: TFLite runtimes to compare ("litert", "tflm").
        verbose: show a progress bar per runtime.

    Returns:
        A `ParityReport`.
    """
    runtimes = tuple(runtimes)
    if not runtimes or any(r not in RUNTIMES for r in runtimes):
        raise ValueError(f"Expected `runtimes` to be a non-empty subset of {RUNTIMES}. Received: runtimes={runtimes!r}")
    x, y = _arrays(data)
    if len(x) == 0:
        raise ValueError("Expected `data` to hold at least one example. Received: data with 0 examples")
    source = tflite_path if isinstance(tflite_path, (bytes, bytearray)) else pathlib.Path(tflite_path)
    compressed = is_compressed(source if isinstance(source, (bytes, bytearray)) else source.read_bytes())
    logits = {"keras": np.asarray(model.predict(x, batch_size=256, verbose=0))}
    if y is not None:  # (N,) or (N, 1) integer labels, one per input, within the model's classes
        y = check_labels(y, n=len(x), num_classes=logits["keras"].shape[-1])
    runners = {runtime: TFLiteModel(uncompressed_path(source) if compressed and runtime == "litert"
                                    and isinstance(source, pathlib.Path) else source, runtime=runtime)
               for runtime in runtimes}
    for runtime, runner in runners.items():
        progress = (keras.utils.Progbar(len(x), unit_name=f"example ({runtime})", verbose=1 if sys.stdout.isatty() else 2)
                    if verbose else None)  # a bar on a terminal, one plain line in a log
        chunks = []
        for start in range(0, len(x), 100):
            chunks.append(runner(x[start:start + 100]))
            if progress is not None:
                progress.update(start + len(chunks[-1]), finalize=start + 100 >= len(x))
        logits[runtime] = np.concatenate(chunks)
    tflm = runners.get("tflm") or TFLiteModel(source, runtime="tflm")
    labels = {k: v.argmax(-1) for k, v in logits.items()}
    return ParityReport(
        examples=int(len(x)),
        accuracy=None if y is None else {k: float(np.mean(v == y)) for k, v in labels.items()},
        agreement={k: float(np.mean(labels[k] == labels["keras"])) for k in runtimes},
        max_logit_difference={k: float(np.max(np.abs(logits[k] - logits["keras"]))) for k in runtimes},
        model_bytes=tflm.model_bytes,
        arena_bytes=tflm.arena_bytes,
        compressed=compressed,
    )
