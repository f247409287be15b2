"""Export, C array and parity report in one step."""

import json
import pathlib

from tinyrobust.export.c_array import to_c_array
from tinyrobust.export.parity import verify
from tinyrobust.export.tflite import to_tflite


def export_and_verify(model, out_dir, name, representative_data, validation_data, runtimes=("litert", "tflm"),
                      record=None, verbose=False):
    """Writes `<name>.tflite`, `<name>.h/.cc` and `<name>.parity.json` into `out_dir`.

    Args:
        model: the Keras model to export.
        out_dir: output folder.
        name: file base name and C array name (a C identifier).
        representative_data: calibration inputs from the train split.
        validation_data: `(x, y)` on which parity is measured.
        runtimes: TFLite runtimes compared with Keras.
        record: extra fields stored in the parity JSON (e.g. calibration indices).
        verbose: print each step, with a progress bar for the parity runs.

    Returns:
        `(tflite path, ParityReport)`.
    """
    out_dir = pathlib.Path(out_dir)
    say = print if verbose else (lambda *_, **__: None)
    say(f"  {name}: folding, int8 conversion and TFLite Micro check -> {out_dir / name}.tflite", flush=True)
    path = to_tflite(model, out_dir / f"{name}.tflite", representative_data)
    to_c_array(path, out_dir, name)
    say(f"  {name}: parity of {', '.join(runtimes)} with Keras", flush=True)
    report = verify(model, path, validation_data, runtimes=runtimes, verbose=verbose)
    (out_dir / f"{name}.parity.json").write_text(json.dumps({**(record or {}), **report.to_dict()}, indent=2) + "\n")
    return path, report
