"""Test helper: the scripts under `benchmarks/`, which are not a package, imported as modules."""

import importlib.util
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    """`benchmarks/<name>.py`, imported as a module.

    Args:
        name: the script's file name without `.py`.

    Returns:
        The module.
    """
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
