"""The robustness benchmark harness: experiment files, runner, result files, tables and plots."""

from tinyrobust.bench.config import ExperimentError, load, select_models
from tinyrobust.bench.results import SCHEMA_VERSION, compare, read_all, table, validate
from tinyrobust.bench.runner import QUALITY_TARGETS, run, write_report
from tinyrobust.bench.specs import Experiment, ExportSpec, ModelSpec, ThreatSpec, TrainSpec

__all__ = ["Experiment", "ExperimentError", "ExportSpec", "ModelSpec", "QUALITY_TARGETS", "SCHEMA_VERSION", "ThreatSpec",
           "TrainSpec", "compare", "load", "read_all", "run", "select_models", "table", "validate", "write_report"]
