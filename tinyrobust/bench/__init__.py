"""The robustness benchmark harness: experiment files, runner, result files, tables and plots."""

from tinyrobust.bench.config import ExperimentError, load
from tinyrobust.bench.results import SCHEMA_VERSION, compare, read_all, table, validate
from tinyrobust.bench.runner import QUALITY_TARGETS, run, write_report

__all__ = ["ExperimentError", "QUALITY_TARGETS", "SCHEMA_VERSION", "compare", "load", "read_all", "run", "table",
           "validate", "write_report"]
