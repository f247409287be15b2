"""The `tinyrobust` command line."""

import argparse
import os
import sys
import time


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _demo(args):
    import keras

    import tinyrobust as tr

    keras.utils.set_random_seed(args.seed)
    train = tr.data.load("fashion_mnist", "train", batch_size=args.batch_size, seed=args.seed, limit=args.limit)
    test = tr.data.load("fashion_mnist", "test", batch_size=256)
    model = tr.models.small_cnn(quantization=args.quantization)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(f"Training {model.name} on Fashion-MNIST for {args.epochs} epoch(s) (seed {args.seed})")
    start = time.perf_counter()
    model.fit(train, epochs=args.epochs, verbose=2)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(test, verbose=0)
    print(f"\nClean test accuracy: {accuracy:.4f} (10,000 test images; training took {seconds:.0f} s)\n")
    tr.summary(model)
    return 0


def _export(args):
    import json
    import pathlib

    import keras

    import tinyrobust as tr

    model_path = pathlib.Path(args.model)
    if not model_path.is_file():
        raise FileNotFoundError(f"No model at {args.model!r}. Received: model={args.model!r}")
    model = keras.saving.load_model(model_path)
    calibration, indices = tr.data.calibration_set(args.dataset, size=args.calibration_size, seed=args.seed)
    x_test, y_test = tr.data.load_arrays(args.dataset, "test", limit=args.parity_size)
    out = pathlib.Path(args.out)
    name = args.name or model_path.stem.replace("-", "_").replace(".", "_")
    path = tr.export.to_tflite(model, out / f"{name}.tflite", calibration)
    tr.export.to_c_array(path, out, name)
    report = tr.export.verify(model, path, (x_test, y_test))
    record = {"model": str(model_path), "dataset": args.dataset, "calibration_indices": [int(i) for i in indices],
              **report.to_dict()}
    (out / f"{name}.parity.json").write_text(json.dumps(record, indent=2) + "\n")
    print(report.to_table())
    print(f"\nWrote {path}, {out / (name + '.h')}, {out / (name + '.cc')} and {out / (name + '.parity.json')}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="tinyrobust", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small quantized CNN on Fashion-MNIST and show its footprint")
    demo.add_argument("--quantization", default="stq", help="float, int8, int4, stb or stq (default: stq)")
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--limit", type=int, default=None, help="train on the first N training images")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    export = commands.add_parser("export", help="export a .keras model to int8 TFLite (Micro), C array and parity report")
    export.add_argument("model", help="path of a .keras model")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--dataset", default="fashion_mnist",
                        help="data set for calibration (train split) and parity (test split)")
    export.add_argument("--name", default=None, help="file and C array name (default: the model file's stem)")
    export.add_argument("--calibration-size", type=int, default=500)
    export.add_argument("--parity-size", type=int, default=1000)
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(run=_export)
    return parser


def main(argv=None):
    """Runs the command line; returns the exit code."""
    _quiet_tensorflow()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"tinyrobust {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
