"""The `tinyrobust` command line."""

import argparse
import errno
import os
import pathlib
import shlex
import sys
import time


def _quiet_tensorflow():
    """Imports TensorFlow without its start-up noise, then the package.

    TensorFlow 2.21 writes its oneDNN, CUDA-stub and absl lines (and on a
    CPU-only machine a cuInit error) to the process's stderr while it imports
    and first lists devices, whatever `TF_CPP_MIN_LOG_LEVEL` says; that output
    is captured and dropped. A user who set `TF_CPP_MIN_LOG_LEVEL` to 0 or 1
    asked for TensorFlow's messages and gets them.
    """
    wanted = os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if wanted:
        import tensorflow as tf
    else:
        from tinyrobust._silence import captured_output

        with captured_output():
            import tensorflow as tf

            tf.config.list_physical_devices()
    tf.get_logger().setLevel("ERROR")  # retracing notices from per-shape attack functions
    import tinyrobust

    tinyrobust._import_all()


EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _output_folder(args, experiment):
    """`--out`, or `runs/<experiment>/<profile or base>`."""
    return pathlib.Path(args.out or pathlib.Path("runs") / experiment / (args.profile or "base"))


def _bench(args):
    from tinyrobust import bench

    config = bench.load(args.experiment, profile=args.profile)
    if getattr(args, "models", None):
        config = bench.select_models(config, [n.strip() for n in args.models.split(",") if n.strip()])
    out = _output_folder(args, config.name)
    command = shlex.join(["tinyrobust", *args.argv])  # quoted: it can be pasted into a shell
    start = time.perf_counter()
    results = bench.run(config, out, command=command, verbose=not args.quiet, fresh=args.fresh)
    print("\n" + bench.table(results))
    print(f"Results: {out / 'results'}  Report (every attack column): {out / 'report.md'}  Plots: {out / 'plots'}  "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


def _sweep(args):
    from tinyrobust.bench import config as config_lib
    from tinyrobust.bench import sweep as sweep_lib

    sweeps = config_lib.load_sweeps(args.experiment, profile=args.profile)
    if args.model:
        sweeps = [s for s in sweeps if s.model == args.model]
    if not sweeps:
        raise ValueError(f"The experiment has no [[sweeps]]{f' of model {args.model!r}' if args.model else ''}. "
                         f"Received: experiment={args.experiment!r}")
    out = _output_folder(args, sweeps[0].candidates[0][1].name)
    command = shlex.join(["tinyrobust", *args.argv])
    for sweep in sweeps:
        record = sweep_lib.run(sweep, out, command=command, verbose=not args.quiet, fresh=args.fresh)
        print(sweep_lib.markdown(record))
    print(f"Sweep records: {out / 'sweeps'}")
    return 0


def _demo(args):
    args.experiment = str(EXPERIMENTS / "fashion_mnist_tiny.toml")
    args.argv = ["bench", args.experiment, "--profile", args.profile] + (["--out", args.out] if args.out else [])
    args.argv += ["--fresh"] if args.fresh else []
    return _bench(args)


def _report(args):
    from tinyrobust import bench
    from tinyrobust.bench import runner

    results = bench.read_all(args.folder)
    path = runner.write_report(results, args.folder)
    print(bench.table(results, wide=args.wide))
    print(f"Wrote {path} and {pathlib.Path(args.folder) / 'plots'}")
    return 0


def _compare(args):
    from tinyrobust import bench

    print(bench.compare(bench.read_all(args.a), bench.read_all(args.b)))
    return 0


def _export(args):
    import keras

    import tinyrobust as tr

    model_path = pathlib.Path(args.model)
    if not model_path.is_file():
        raise FileNotFoundError(f"No model at {args.model!r}. Received: model={args.model!r}")
    name = tr.export.c_array.check_identifier(args.name or model_path.stem.replace("-", "_").replace(".", "_"))
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"The output folder is a file. Received: out={args.out!r}")
    for option in ("calibration_size", "parity_size"):
        if getattr(args, option) < 1:
            raise ValueError(f"Expected --{option.replace('_', '-')} to be at least 1. "
                             f"Received: {option}={getattr(args, option)}")
    arena_limit = _arena_limit(args.arena_limit)
    model = keras.saving.load_model(model_path)
    calibration, indices = tr.data.calibration_set(args.dataset, size=args.calibration_size, seed=args.seed)
    x_test, y_test = tr.data.load_arrays(args.dataset, "test", limit=args.parity_size)
    record = {"model": str(model_path), "dataset": args.dataset, "calibration_indices": [int(i) for i in indices]}
    path, report = tr.export.export_and_verify(model, out, name, calibration, (x_test, y_test), record=record,
                                               compress=args.compress, arena_limit=arena_limit,
                                               input_range=tr.data.info(args.dataset).input_range)
    print(report.to_table())
    written = [path, out / (name + ".h"), out / (name + ".cc"), out / (name + ".parity.json")]
    if args.compress:
        compression = tr.export.compression_report_path(path)
        print("\n" + tr.export.CompressionReport.load(compression).to_table())
        written += [tr.export.uncompressed_path(path), compression]
    print(f"\nWrote {', '.join(map(str, written))}")
    return 0


def _arena_limit(text):
    """`--arena-limit`: a number >= 1, or "none" (the smallest flash), checked before any work."""
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = text
    from tinyrobust.export.compress import check_arena_limit

    check_arena_limit(value)
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="tinyrobust", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run an experiment file: train, attack, export, report")
    bench.add_argument("experiment", help="experiment TOML file (see experiments/)")
    bench.add_argument("--profile", default=None, help="profile defined in the file: smoke, demo, quick, full, ...")
    bench.add_argument("--out", default=None, help="output folder (default: runs/<experiment>/<profile>)")
    bench.add_argument("--quiet", action="store_true", help="no progress output")
    bench.add_argument("--models", default=None,
                       help="comma-separated model names to run (default: all), e.g. the teacher stage on one "
                            "machine and the students on another, from <out>/models/<teacher>.keras")
    bench.add_argument("--fresh", action="store_true", help="delete the earlier work of these models in the output folder and start them over (needed when "
                            "models or checkpoints there were trained with other settings)")
    bench.set_defaults(run=_bench)
    sweep = commands.add_parser("sweep", help="train the candidates of an experiment's [[sweeps]] and choose "
                                              "settings on the validation split (never the test split)")
    sweep.add_argument("experiment", help="experiment TOML file with [[sweeps]]")
    sweep.add_argument("--profile", default=None, help="profile defined in the file")
    sweep.add_argument("--model", default=None, help="only the sweep of this model")
    sweep.add_argument("--out", default=None, help="output folder (default: runs/<experiment>/<profile>); records "
                                                  "go to <out>/sweeps/<model>.{json,md}")
    sweep.add_argument("--quiet", action="store_true", help="no progress output")
    sweep.add_argument("--fresh", action="store_true", help="start the candidates over")
    sweep.set_defaults(run=_sweep)
    demo = commands.add_parser("demo", help="the fashion_mnist_tiny experiment: float vs STQ vs STQ+JR under FGSM, "
                                            "PGD and the autoattack-fast suite, exported to TFLite Micro and attacked "
                                            "there with Square and HopSkipJump (about 8.5 min on 2 cores)")
    demo.add_argument("--profile", default="demo", help="profile of experiments/fashion_mnist_tiny.toml")
    demo.add_argument("--out", default=None)
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument("--fresh", action="store_true", help="delete the earlier work of these models in the output folder and start them over (needed when "
                            "models or checkpoints there were trained with other settings)")
    demo.set_defaults(run=_demo)
    report = commands.add_parser("report", help="rebuild report.md and plots from the result JSON files in FOLDER")
    report.add_argument("folder")
    report.add_argument("--wide", action="store_true", help="also print the table of every attack column")
    report.set_defaults(run=_report)
    compare = commands.add_parser("compare", help="show two result folders side by side")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.set_defaults(run=_compare)
    export = commands.add_parser("export", help="export a .keras model to int8 TFLite (Micro), C array and parity report")
    export.add_argument("model", help="path of a .keras model")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--dataset", default="fashion_mnist",
                        help="data set for calibration (train split) and parity (test split)")
    export.add_argument("--name", default=None, help="file and C array name (default: the model file's stem)")
    export.add_argument("--calibration-size", type=int, default=500)
    export.add_argument("--parity-size", type=int, default=1000)
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--compress", action="store_true",
                        help="ship ternary/binary/int4 weights as 1-4 bit TFLM_DECODE look-up tables, bit-exact with "
                             "the int8 file (written beside it as <name>.int8.tflite)")
    export.add_argument("--arena-limit", default="1.1",
                        help="with --compress: the largest TFLite Micro arena, as a multiple of the int8 file's; "
                             "large kernels run in output-channel groups to stay within it (default 1.1), or "
                             "'none' for the smallest flash")
    export.set_defaults(run=_export)
    return parser


def main(argv=None):
    """Runs the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # --help and argument errors end here, before TensorFlow loads
    args.argv = argv
    _quiet_tensorflow()
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"tinyrobust {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only or forbidden folder: one line; the work done so far stays
        if error.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(f"tinyrobust {args.command}: cannot write{where}: {os.strerror(error.errno)}. Free space or choose "
              f"another --out; the work done so far is kept and a rerun resumes it.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = " Run the same command again to resume." if args.command in ("bench", "demo") else ""
        print(f"\ntinyrobust {args.command}: interrupted.{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
