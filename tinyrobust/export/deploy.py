"""Export, C array and parity report in one step."""

import pathlib

from tinyrobust import files
from tinyrobust.export.c_array import check_identifier, to_c_array
from tinyrobust.export.compress import ARENA_LIMIT, CompressionReport
from tinyrobust.export.flatbuffer import compression_report_path
from tinyrobust.export.parity import verify
from tinyrobust.export.tflite import to_tflite


def export_and_verify(model, out_dir, name, representative_data, validation_data, runtimes=("litert", "tflm"),
                      record=None, verbose=False, compress=False, input_range=(0.0, 1.0),
                      arena_limit=ARENA_LIMIT):
    """Writes `<name>.tflite`, `<name>.h/.cc` and `<name>.parity.json` into `out_dir`.

    With `compress=True` the shipped `<name>.tflite` (and the C array) hold
    LUT-compressed low-bit weights; `<name>.int8.tflite` and
    `<name>.compression.json` go beside it (see `to_tflite`), and the parity
    JSON holds the compression report under `compression`.

    Args:
        model: the Keras model to export.
        out_dir: output folder.
        name: file base name and C array name (a C identifier).
        representative_data: calibration inputs from the train split.
        validation_data: `(x, y)` on which parity is measured.
        runtimes: TFLite runtimes compared with Keras.
        record: extra fields stored in the parity JSON (e.g. calibration indices).
        verbose: print each step, with a progress bar for the parity runs.
        compress: ship low-bit weights below int8 (`to_tflite(compress=True)`).
        input_range: the model's valid inputs; calibration inputs outside are refused (`to_tflite`).
        arena_limit: with `compress`, the largest arena wanted as a multiple of the int8 arena (`to_tflite`).

    Returns:
        `(tflite path, ParityReport)`.
    """
    check_identifier(name)  # before anything is written
    out_dir = pathlib.Path(out_dir)
    say = print if verbose else (lambda *_, **__: None)
    steps = "int8 conversion, compression (bit-exact check)" if compress else "int8 conversion"
    say(f"  {name}: folding, {steps} and TFLite Micro check -> {out_dir / name}.tflite", flush=True)
    path = to_tflite(model, out_dir / f"{name}.tflite", representative_data, compress=compress,
                     input_range=input_range, arena_limit=arena_limit)
    compression = CompressionReport.load(compression_report_path(path)).to_dict() if compress else None
    if compression is not None:
        say(f"  {name}: {compression['int8_bytes']:,} B int8 -> {compression['flash_bytes']:,} B flash, arena "
            f"{compression['int8_arena_bytes']:,} -> {compression['arena_bytes']:,} B", flush=True)
    to_c_array(path, out_dir, name)
    say(f"  {name}: parity of {', '.join(runtimes)} with Keras", flush=True)
    report = verify(model, path, validation_data, runtimes=runtimes, verbose=verbose)
    parity = {**(record or {}), **report.to_dict(), "compression": compression,
              "tflite_sha256": files.file_sha256(path)}
    files.write_json(out_dir / f"{name}.parity.json", parity)
    return path, report
