"""The robustness benchmark harness: experiment files, runner, result files, tables and plots."""

from tinyrobust.bench.config import ExperimentError, load, select_models
from tinyrobust.bench.results import SCHEMA_VERSION, compare, read_all, table, validate
from tinyrobust.bench.runner import QUALITY_TARGETS, run, write_report

__all__ = ["ExperimentError", "QUALITY_TARGETS", "SCHEMA_VERSION", "compare", "load", "read_all", "run",
           "select_models", "table", "validate", "write_report"]
