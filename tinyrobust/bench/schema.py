"""The typed record of a result file, `results/<model>__<norm>.json`.

The dataclasses below are the one statement of the format: each field's type
and meaning. `check(result)` checks a result dict against them, and
`json_schema()` generates the JSON Schema committed as
`benchmarks/results/result.schema.json` (a test keeps the two equal;
`python -m tinyrobust.bench.schema` rewrites it). A field with a default may
be absent: results written by earlier versions lack it.
"""

import dataclasses
import pathlib
import sys
import types
import typing
from typing import Any, Optional

from tinyrobust import files

__all__ = ["Result", "Model", "ThreatModel", "Deployed", "MultiExit", "EarlyExit", "EarlyStopping", "QualityTarget",
           "SplitAccuracy", "WallTime", "Machine", "PerExample", "Bits", "check", "json_schema", "SCHEMA_FILE"]

SCHEMA_FILE = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "result.schema.json"
_ABSENT = dataclasses.MISSING


def _field(doc, default=_ABSENT):
    if default is _ABSENT:
        return dataclasses.field(metadata={"doc": doc})
    if isinstance(default, dict):  # an optional mapping, empty by default
        return dataclasses.field(default_factory=dict, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


PerEps = dict[str, float]  # {str(eps): accuracy}


@dataclasses.dataclass(frozen=True)
class Model:
    """The evaluated model."""

    name: str = _field("the model's name in the experiment")
    architecture: str = _field("model zoo name (`tinyrobust.models`)")
    quantization: str = _field("quantization preset: float, int8, int4, stb, stq, ...")
    params: int = _field("parameter count (`tinyrobust.summary`)")
    int8_bytes: int = _field("weight bytes at 8 bits (`tinyrobust.summary`)")
    packed_bytes: float = _field("weight bytes at each layer's own bit width (`tinyrobust.summary`)")
    options: dict[str, Any] = _field("builder options of the experiment entry", {})
    jacobian: dict[str, Any] = _field("Jacobian regularization weight per layer ('input' for the input), or "
                                      "{layers: {...}, batch_fraction} as the experiment file gives it", {})
    adversary: Optional[dict[str, Any]] = _field("adversarial training table of the experiment entry, or null", None)
    distill: Optional[dict[str, Any]] = _field("the student's {teacher, method, ...} table, or null", None)
    exits: Optional[dict[str, Any]] = _field("multi-exit table {layers, thresholds}, or null", None)
    neokd: Optional[dict[str, Any]] = _field("NEO-KD table, or null", None)
    early_stopping: Optional[dict[str, Any]] = _field("early-stopping table {examples, steps, collapse}, or null", None)
    bits: dict[str, int] = _field("kernel bits per quantized layer", {})


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """What the attacks were allowed."""

    norm: str = _field("'linf' or 'l2'")
    epsilons: list[float] = _field("the radii, in input units")
    examples: int = _field("the first N test examples that clean_accuracy and every attack column are measured on")


@dataclasses.dataclass(frozen=True)
class QualityTarget:
    """MLPerf Tiny's quality target for the model and data set."""

    metric: str = _field("'test_accuracy' (the whole test split); 'clean_accuracy' (the attacked examples) in "
                         "records from before `test_accuracy`")
    target: float = _field("the target accuracy")
    met: bool = _field("whether that accuracy reaches it")


@dataclasses.dataclass(frozen=True)
class SplitAccuracy:
    """Clean accuracy on a whole data split."""

    accuracy: float = _field("top-1 accuracy of the Keras model with its weights quantized as evaluated and "
                             "deployed (deterministic inference)")
    examples: int = _field("examples in the split")


@dataclasses.dataclass(frozen=True)
class Bits:
    """A boolean per example (`tinyrobust.bench.per_example`): `numpy.packbits` as hex, and the count."""

    n: int = _field("number of examples")
    bits: str = _field("hex of numpy.packbits of the per-example booleans")


@dataclasses.dataclass(frozen=True)
class PerExample:
    """Which examples were classified correctly, for paired tests of claims (absent in records from before it)."""

    clean: Bits = _field("correct on the clean input, per example")
    worst_case: dict[str, Bits] = _field("per eps: correct under clean and every attack, per example")
    test_split: Optional[Bits] = _field("correct on the whole test split, per example", None)


@dataclasses.dataclass(frozen=True)
class Deployed:
    """The shipped TFLite Micro artifact, evaluated on the first `examples` test examples."""

    model_bytes: int = _field("flash bytes of the shipped .tflite")
    arena_bytes: int = _field("its TFLite Micro arena bytes")
    clean_accuracy: float = _field("TFLite Micro accuracy, clean")
    robust_accuracy: dict[str, PerEps] = _field(
        "per deployed attack ('transfer', 'square', 'hopskipjump') and eps, ANDed with clean correctness")
    parity_examples: int = _field("examples of the parity check (Keras vs TFLite Micro)")
    agreement: float = _field("fraction of parity examples where Keras and TFLite Micro agree")
    max_logit_difference: float = _field("largest logit difference on the parity examples")
    examples: Optional[int] = _field("the first N test examples every deployed number is measured on", None)
    keras_accuracy: Optional[float] = _field("the Keras model's accuracy on those examples", None)
    parity_keras_accuracy: Optional[float] = _field(
        "Keras accuracy on the parity examples (before the shared example set, `keras_accuracy` and "
        "`clean_accuracy` were on the parity examples and these two were absent)", None)
    parity_clean_accuracy: Optional[float] = _field("TFLite Micro accuracy on the parity examples", None)
    worst_case: Optional[PerEps] = _field(
        "per example over clean and every deployed attack, never rising with eps (absent before the shared "
        "example set)", None)
    compress: Optional[bool] = _field("the [export] compress setting (absent before compression)", None)
    compressed: Optional[bool] = _field("whether the shipped file holds LUT-compressed weights", None)
    int8_model_bytes: Optional[int] = _field("flash bytes of the plain int8 file", None)
    int8_arena_bytes: Optional[int] = _field("arena bytes of the plain int8 file", None)
    channel_groups: Optional[dict[str, int]] = _field(
        "operators of the compressed file run in output-channel groups to bound its arena ({'<index> <OPERATOR>': "
        "groups}; absent before arena bounding)", None)
    seconds_per_inference: Optional[float] = _field(
        "median host TFLite Micro interpreter time of one inference of the shipped file (not a microcontroller's "
        "time; absent before it was measured)", None)
    int8_seconds_per_inference: Optional[float] = _field(
        "the same for the int8 file, when the shipped file is compressed: the ratio is the DECODE overhead", None)
    input_scale: Optional[float] = _field("the int8 input step", None)
    eps_in_input_steps: Optional[PerEps] = _field("eps / input_scale", None)
    checks: dict[str, str] = _field("honest-evaluation flags on the deployed model, e.g. eps_below_input_step", {})
    calibration_indices_sha: Optional[str] = _field("digest of the train-split indices used for calibration", None)
    fingerprint: Optional[str] = _field("the result's fingerprint (see `Result.fingerprint`)", None)
    per_example: Optional[PerExample] = _field("per-example correctness on the deployed examples", None)


@dataclasses.dataclass(frozen=True)
class EarlyExit:
    """Confidence-threshold early-exit inference."""

    accuracy: float = _field("accuracy")
    relative_compute: float = _field("mean compute relative to always running the final exit")
    average_macs: float = _field("mean multiply-accumulates per example")


@dataclasses.dataclass(frozen=True)
class MultiExit:
    """Every exit of a multi-exit model (whose other fields describe its final exit)."""

    exit_macs: list[float] = _field("cumulative multiply-accumulates per exit")
    clean: list[float] = _field("clean accuracy per exit")
    attacks: dict[str, dict[str, list[float]]] = _field("per MultiExitPGD target and eps: accuracy per exit")
    early_exit: dict[str, dict[str, Any]] = _field(
        "{'clean': {threshold: EarlyExit}, '<target>': {eps: {threshold: EarlyExit}}}")


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """How `callbacks.RobustEarlyStopping` chose the trained weights (epochs 1-based)."""

    robust_accuracy: list[float] = _field("PGD accuracy on the held-out training examples after each epoch")
    best_epoch: int = _field("the epoch whose weights were kept (the first of ties)")
    stopped_epoch: Optional[int] = _field("the epoch after which training stopped on a collapse, or null")
    keep_from_epoch: Optional[int] = _field(
        "the first epoch whose weights could be kept (the first without quantization noise, when it fades); "
        "absent when every epoch could", None)


@dataclasses.dataclass(frozen=True)
class WallTime:
    """Seconds spent by each step of the run that wrote the result (null: not done in that run)."""

    train: Optional[float] = _field("training")
    evaluate: Optional[float] = _field("attacks and checks on the Keras model")
    export: Optional[float] = _field("export (in records without `deployed`: export and deployed evaluation)")
    deployed: Optional[float] = _field("the deployed artifact's evaluation (absent in records from before it)",
                                       None)


@dataclasses.dataclass(frozen=True)
class Machine:
    """The host that wrote the result (`tinyrobust.bench.runner.machine`)."""

    cpu: str = _field("CPU model name")
    cpu_id: Optional[str] = _field("CPU family, model and stepping, or null where /proc/cpuinfo does not exist")
    isa: list[str] = _field("the vector extensions that pick TensorFlow's CPU kernels (avx2, avx512f, ...)")
    cores: int = _field("cores this process could use")
    system: str = _field("operating system and kernel (`platform.platform()`)")


@dataclasses.dataclass(frozen=True)
class Result:
    """One model under one threat model."""

    schema_version: int = _field("1")
    experiment: str = _field("the experiment's name")
    profile: Optional[str] = _field("the profile, or null for the base settings")
    dataset: str = _field("data set name (`tinyrobust.data`)")
    seed: int = _field("the run's seed")
    command: str = _field("the command line that produced it, shell-quoted")
    versions: dict[str, str] = _field("versions of Python and the packages that decide the numbers")
    model: Model = _field("the model")
    threat_model: ThreatModel = _field("the threat model")
    clean_accuracy: float = _field("accuracy on the attacked examples (the test split's first "
                                   "`threat_model.examples`), the baseline of every robust column")
    robust_accuracy: dict[str, PerEps] = _field(
        "per attack and eps, ANDed with clean correctness; a suite has its own column ('autoattack') and one per "
        "stage ('autoattack/apgd-ce': still robust after that stage)")
    worst_case: PerEps = _field("per example over every attack, never rising with eps")
    queries: dict[str, PerEps] = _field("mean model queries per attack and eps (query-counting attacks)")
    attack_kinds: dict[str, str] = _field("per attack: 'single-step', 'iterative', 'black-box', 'suite', ...")
    checks: dict[str, str] = _field("honest-evaluation flags and their messages; empty when clean")
    wall_time_s: WallTime = _field("seconds per step")
    quality_target: Optional[QualityTarget] = _field("MLPerf Tiny's target, or null where there is none")
    deployed: Optional[Deployed] = _field("the deployed artifact, or null without export")
    multi_exit: Optional[MultiExit] = _field("every exit of a multi-exit model, or null", None)
    test_accuracy: Optional[SplitAccuracy] = _field(
        "clean accuracy on the whole test split, the quality number (absent in records from before it)", None)
    early_stopping: Optional[EarlyStopping] = _field("the epoch selection of a model with `early_stopping`, or null",
                                                     None)
    settings: Optional[dict[str, Any]] = _field(
        "exactly the settings that produced it: model fingerprint, threat_model, export, versions, and "
        "model_settings (dataset, seed, train recipe, experiment entry, teacher fingerprint); absent before "
        "fingerprints", None)
    fingerprint: Optional[str] = _field("hash of `settings` without model_settings "
                                        "(`tinyrobust.bench.fingerprints`)", None)
    machine: Optional[Machine] = _field(
        "the host that wrote it: wall times and the last digits depend on it (absent in records from before it)",
        None)
    per_example: Optional[PerExample] = _field("per-example correctness on the attacked examples and the whole "
                                               "test split", None)


def _optional(hint):
    """X for Optional[X], else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _check(value, hint, where):
    if hint is Any:
        return
    inner = _optional(hint)
    if inner is not None:
        if value is not None:
            _check(value, inner, where)
        return
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"Expected `{where}` to be an object. Received: {where}={value!r}")
        hints = typing.get_type_hints(hint)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            raise ValueError(f"Unknown field(s) in `{where}`: {unknown}")
        for field in dataclasses.fields(hint):
            name = f"{where}.{field.name}" if where else field.name
            if field.name not in value:
                if field.default is _ABSENT and field.default_factory is _ABSENT:
                    raise ValueError(f"Result is missing `{name}`")
                continue
            _check(value[field.name], hints[field.name], name)
        return
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"Expected `{where}` to be a list. Received: {where}={value!r}")
        for i, item in enumerate(value):
            _check(item, typing.get_args(hint)[0], f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"Expected `{where}` to be an object. Received: {where}={value!r}")
        for key, item in value.items():
            _check(item, typing.get_args(hint)[1], f"{where}.{key}")
        return
    kinds = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}[hint]
    if not isinstance(value, kinds) or (hint is not bool and isinstance(value, bool)):
        raise ValueError(f"Expected `{where}` of type {hint.__name__}. Received: {where}={value!r}")


def check(result):
    """Checks `result` (a dict read from JSON) against `Result`; returns it.

    Raises:
        ValueError: naming the first field that is missing, unknown or of the wrong type.
    """
    _check(result, Result, "")
    return result


def _schema(hint):
    if hint is Any:
        return {}
    inner = _optional(hint)
    if inner is not None:
        return {"anyOf": [_schema(inner), {"type": "null"}]}
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        properties = {}
        for field in dataclasses.fields(hint):
            properties[field.name] = {**_schema(hints[field.name]), "description": field.metadata["doc"]}
        required = [f.name for f in dataclasses.fields(hint)
                    if f.default is _ABSENT and f.default_factory is _ABSENT]
        return {"type": "object", "description": (hint.__doc__ or "").strip(), "properties": properties,
                "required": required, "additionalProperties": False}
    origin = typing.get_origin(hint)
    if origin is list:
        return {"type": "array", "items": _schema(typing.get_args(hint)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema(typing.get_args(hint)[1])}
    return {"type": {int: "integer", float: "number", str: "string", bool: "boolean"}[hint]}


def json_schema():
    """The JSON Schema (draft 2020-12) of a result file, generated from `Result`."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "tinyrobust result file",
            **_schema(Result)}


def main():
    """Writes `json_schema()` to `SCHEMA_FILE` (or the path given as the only argument)."""
    path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_FILE
    files.write_json(path, json_schema())
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
