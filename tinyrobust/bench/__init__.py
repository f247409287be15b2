"""The robustness benchmark harness: experiment files, the run folder, the stages, result files, tables and plots.

`load` reads an experiment file into typed specs; `run` is the loop over
seeds, models and threat models that calls the stages (`tinyrobust.bench.stages`:
train -> export -> evaluate -> deployed -> multi-exit) in one `RunFolder`
per seed, and composes their records into result files.
"""

from tinyrobust.bench.config import ExperimentError, load, select_models
from tinyrobust.bench.results import SCHEMA_VERSION, compare, read_all, table, validate
from tinyrobust.bench.run_folder import RunFolder
from tinyrobust.bench.runner import QUALITY_TARGETS, model_settings, run, write_report
from tinyrobust.bench.specs import Experiment, ExportSpec, ModelSpec, ThreatSpec, TrainSpec

__all__ = ["Experiment", "ExperimentError", "ExportSpec", "ModelSpec", "QUALITY_TARGETS", "RunFolder", "SCHEMA_VERSION",
           "ThreatSpec", "TrainSpec", "compare", "load", "model_settings", "read_all", "run", "select_models", "table",
           "validate", "write_report"]
