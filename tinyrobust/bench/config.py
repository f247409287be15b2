"""Experiment files: TOML, validated before any work starts.

An experiment names a dataset, a list of models (architecture, quantization,
Jacobian regularization, adversarial training), a training recipe, threat
models with their attack suites, and export settings. `[profiles.<name>]`
tables are deep-merged over the base settings (smoke / quick / full, ...),
except that a profile's `models` list replaces the base's, and so does a
profile's attack suite when every entry in it names its `type` (entries
without `type` only change parameters of the base's attacks).
See `experiments/README.md` for the full key reference. `load` checks
everything by building every configured object (models against the data set,
Jacobian layers against the built model, adversaries, attacks, suites, exits)
and returns frozen specs (`tinyrobust.bench.specs`), which the runner reads.
"""

import copy
import dataclasses
import inspect
import itertools
import pathlib
import re
import tomllib
from collections.abc import Mapping

from tinyrobust import attacks, data, distill, distribute, export, models, multiexit, quantizers, training
from tinyrobust.attacks.base import classes_of, input_shape_of
from tinyrobust.bench.specs import Experiment, jacobian_settings
from tinyrobust.validation import check_number

ATTACKS = {
    "FGSM": attacks.FGSM, "PGD": attacks.PGD, "MIM": attacks.MIM, "APGD": attacks.APGD,
    "CarliniWagnerL2": attacks.CarliniWagnerL2, "DeepFool": attacks.DeepFool, "Square": attacks.Square,
    "SimBA": attacks.SimBA, "HopSkipJump": attacks.HopSkipJump, "Boundary": attacks.Boundary,
}
NORMS = ("linf", "l2")
_ONLY_NORM = {"CarliniWagnerL2": "l2", "Boundary": "l2"}
_TOP = {"name", "description", "dataset", "seed", "train", "models", "threat_models", "export", "profiles", "sweeps"}
_SWEEP = {"model", "grid", "select", "epsilon", "min_clean", "examples", "steps"}
_SWEEP_DEFAULTS = {"select": "robust", "min_clean": None, "examples": 1000, "steps": 10}
SELECTIONS = ("clean", "robust", "robust_with_clean")
# What a sweep may vary: a model entry's tables (dotted into them) and the recipe's scalars.
_SWEEPABLE = {"jacobian", "adversary", "distill", "neokd", "options", "quantization", "early_stopping"}
_TRAIN = {"epochs", "batch_size", "learning_rate", "limit", "augment", "validation_fraction", "distribute",
          "schedule", "warmup_epochs", "jacobian_ramp_epochs", "epsilon_ramp_epochs", "noise_anneal_epochs",
          "noise_anneal_start"}
_SCHEDULES = ("constant", "cosine")
_MODEL = {"name", "architecture", "quantization", "options", "jacobian", "adversary", "distill", "exits", "neokd",
          "seeds", "early_stopping"}
_EARLY_STOPPING = {"examples", "steps", "collapse"}
_EARLY_STOPPING_DEFAULTS = {"examples": 1000, "steps": 10, "collapse": 0.2}
_DISTILL = {"teacher", "method", "temperature", "alpha", "teacher_seed", "attack_training"}
_EXITS = {"layers", "thresholds", "head"}
_NEOKD = {"alpha", "beta", "attack", "exit_weights"}
_MULTI_EXIT = {"steps", "targets"}
_MULTI_EXIT_TARGETS = ("average", "max_average")
_ADVERSARY = {"method", "epsilon", "steps", "step_size", "beta", "noise", "align_weight"}
_THREAT = {"epsilons", "examples", "attacks", "suite", "multi_exit", "deployed_epsilons"}
_SUITE = {"name", "steps", "target_classes", "queries"}
_EXPORT = {"enabled", "compress", "calibration_size", "parity_examples", "deployed_examples", "deployed_attacks",
           "deployed_queries", "arena_limit"}
_DEPLOYED_ATTACKS = ("transfer", "square", "hopskipjump")
_DEFAULTS = {
    "seed": 0,
    "train": {"epochs": 1, "batch_size": 64, "learning_rate": 1e-3, "limit": None, "augment": False,
              "validation_fraction": 0.1, "distribute": None, "schedule": None, "warmup_epochs": None,
              "jacobian_ramp_epochs": None, "epsilon_ramp_epochs": None, "noise_anneal_epochs": None},
    "export": {"enabled": True, "compress": True, "calibration_size": 500, "parity_examples": 1000, "deployed_examples": None,
               "deployed_attacks": ["transfer", "square"], "deployed_queries": 200, "arena_limit": export.ARENA_LIMIT},
}


class ExperimentError(ValueError):
    """An experiment file that cannot run; the message names the key."""


def _merge(base, override):
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, _Replace):
            merged[key] = copy.deepcopy(dict(value))
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _with_suites_replaced(base, override, profile):
    """The profile `override`, its complete attack suites (every entry has a `type`) set to replace the base's.

    Raises:
        ExperimentError: a suite mixes new attacks (with `type`) and changes
            to the base's (without), or changes an attack the base lacks.
    """
    override = copy.deepcopy(override)
    for norm, threat in (override.get("threat_models") or {}).items():
        suite = threat.get("attacks") if isinstance(threat, dict) else None
        if not isinstance(suite, dict):
            continue
        where = f"profiles.{profile}.threat_models.{norm}.attacks"
        typed = {name for name, spec in suite.items() if isinstance(spec, dict) and "type" in spec}
        if typed and typed != set(suite):
            raise ExperimentError(f"A profile's attack suite either replaces the base suite (every entry has a "
                                  f"`type`) or changes the base's attacks (no entry has one). Received: "
                                  f"{where} with `type` in {sorted(typed)} only")
        if typed:
            threat["attacks"] = _Replace(suite)
            continue
        base_suite = ((base.get("threat_models") or {}).get(norm) or {}).get("attacks") or {}
        for name in suite:
            if name not in base_suite:
                raise ExperimentError(f"The profile changes an attack the base suite lacks (base: "
                                      f"{', '.join(base_suite) or 'none'}; give a `type` to define it). "
                                      f"Received: {where}.{name}")
    return override


def _check_recipe(train):
    """The learning-rate schedule and the per-epoch ramps of `[train]` (all optional)."""
    if train["schedule"] not in (None, *_SCHEDULES):
        raise ExperimentError(f"Expected `train.schedule` to be one of {', '.join(map(repr, _SCHEDULES))}. "
                              f"Received: train.schedule={train['schedule']!r}")
    epochs = train["epochs"]
    for key in ("warmup_epochs", "jacobian_ramp_epochs", "epsilon_ramp_epochs", "noise_anneal_epochs"):
        if train[key] is not None:
            _number(f"train.{key}", train[key], low=0, high=epochs, integer=True)
    start = train.get("noise_anneal_start")
    if start is not None:
        if not train["noise_anneal_epochs"]:
            raise ExperimentError("`train.noise_anneal_start` places the noise fade: set `train.noise_anneal_epochs` "
                                  f"too. Received: train.noise_anneal_start={start!r}")
        _number("train.noise_anneal_start", start, low=1, high=epochs - train["noise_anneal_epochs"] + 1,
                integer=True)
    if train["warmup_epochs"] is not None and epochs and train["warmup_epochs"] >= epochs:
        raise ExperimentError(f"`train.warmup_epochs` must leave at least one epoch after the warm-up "
                              f"(train.epochs={epochs}). Received: train.warmup_epochs={train['warmup_epochs']}")


class _Replace(dict):
    """A profile table that `_merge` puts in place of the base's instead of merging into it."""


def _unknown(where, table, allowed):
    extra = sorted(set(table) - allowed)
    if extra:
        raise ExperimentError(f"Unknown key '{where}{extra[0]}' (allowed: {', '.join(sorted(allowed))}). "
                              f"Received: {where}{extra[0]}={table[extra[0]]!r}")


def _number(where, value, **bounds):
    """`check_number` for an experiment key, raising `ExperimentError`."""
    try:
        return check_number(where, value, **bounds)
    except ValueError as error:
        raise ExperimentError(str(error)) from None


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


_NAME_LENGTH = 100  # file names are at most 255 bytes, and a name gets suffixes such as `__linf.deployed.json`


def _check_name(where, name):
    """Names become file names: letters, digits, `_`, `.` and `-` only (no path separators), at most 100."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name or len(name) > _NAME_LENGTH:
        raise ExperimentError(f"Expected `{where}` to be a name of at most {_NAME_LENGTH} letters, digits, '_', '.' "
                              f"and '-' (it names files). Received: {where}={name!r}")


_JACOBIAN_NESTED = {"layers", "batch_fraction"}


def _check_jacobian(where, table):
    if isinstance(table.get("layers"), Mapping):
        _unknown(f"{where}jacobian.", table, _JACOBIAN_NESTED)
        _number(f"{where}jacobian.batch_fraction", table.get("batch_fraction", 1.0), low=0, low_open=True, high=1)
        where = f"{where}jacobian.layers."
    else:
        where = f"{where}jacobian."
    layers, _ = jacobian_settings(table)
    if not layers:
        raise ExperimentError(f"Expected `{where[:-1]}` to give at least one weight. Received: {where[:-1]}={layers!r}")
    for layer, weight in layers.items():
        _number(f"{where}{layer}", weight, low=0)


def _check_builds(where, model, dataset_info):
    """Builds the architecture with its options and checks the Jacobian layers against it; returns the model."""
    try:
        built = models.get(model["architecture"], quantization=model["quantization"],
                           num_classes=dataset_info.num_classes, input_shape=dataset_info.input_shape,
                           **model["options"])
    except (TypeError, ValueError) as error:
        raise ExperimentError(f"`{where}options` do not build {model['architecture']!r}: {error}. "
                              f"Received: {where}options={model['options']!r}") from None
    layers = {layer.name for layer in built.layers}
    for layer in jacobian_settings(model.get("jacobian") or {})[0]:
        if layer != "input" and layer not in layers:
            raise ExperimentError(f"`{where}jacobian` names a layer {model['architecture']!r} does not have "
                                  f"(use 'input' or one of its layer names, e.g. {sorted(layers)[:5]}). "
                                  f"Received: {where}jacobian.{layer}")
    return built


def _distinct_seeds(seeds):
    """True for a non-empty list of distinct values (the experiment's `seed` list and a model's `seeds`)."""
    return isinstance(seeds, list) and bool(seeds) and len(set(map(str, seeds))) == len(seeds)


def _check_model_seeds(where, seeds, experiment_seeds):
    """A model's `seeds`: a non-empty list of distinct seeds of the experiment."""
    if not _distinct_seeds(seeds) or any(seed not in experiment_seeds for seed in seeds):
        raise ExperimentError(f"Expected `{where}seeds` to be a non-empty list of distinct seeds of the experiment "
                              f"(seed = {list(experiment_seeds)}). Received: {where}seeds={seeds!r}")


def _check_models(config):
    if not isinstance(config.get("models"), list) or not config["models"]:
        raise ExperimentError("Expected `models` to be a non-empty array of tables ([[models]]). "
                              f"Received: models={config.get('models')!r}")
    names = set()
    for i, model in enumerate(config["models"]):
        where = f"models[{i}]."
        if not isinstance(model, dict):
            raise ExperimentError(f"Expected `models[{i}]` to be a table ([[models]]). Received: models[{i}]={model!r}")
        _unknown(where, model, _MODEL)
        for key in ("name", "architecture"):
            if not isinstance(model.get(key), str):
                raise ExperimentError(f"Expected `{where}{key}` to be a string. Received: {key}={model.get(key)!r}")
        _check_name(f"{where}name", model["name"])
        exported = model["name"].replace("-", "_")  # the exported files' and C array's name (ModelSpec.file_name)
        clash = next((n for n in names if n.replace("-", "_") == exported and n != model["name"]), None)
        if clash is not None:
            raise ExperimentError(f"Model names {clash!r} and {model['name']!r} export to the same files "
                                  f"({exported}.tflite): rename one. Received: {where}name={model['name']!r}")
        if model["name"] in names:
            raise ExperimentError(f"Duplicate model name. Received: {where}name={model['name']!r}")
        names.add(model["name"])
        if model["architecture"] not in models.BUILDERS:
            raise ExperimentError(f"Unknown architecture (allowed: {', '.join(sorted(models.BUILDERS))}). "
                                  f"Received: {where}architecture={model['architecture']!r}")
        model.setdefault("quantization", "float")
        if model["quantization"] not in quantizers.PRESETS:
            raise ExperimentError(f"Unknown quantization (allowed: {', '.join(quantizers.PRESETS)}). "
                                  f"Received: {where}quantization={model['quantization']!r}")
        model.setdefault("options", {})
        for key in ("options", "jacobian", "adversary"):
            if model.get(key) is not None and not isinstance(model[key], dict):
                raise ExperimentError(f"Expected `{where}{key}` to be a table. Received: {where}{key}={model[key]!r}")
        if model.get("jacobian") is not None:
            _check_jacobian(where, model["jacobian"])
        built = _check_builds(where, model, data.info(config["dataset"]))
        adversary = model.get("adversary")
        if adversary is not None:
            _unknown(f"{where}adversary.", adversary, _ADVERSARY)
            if adversary.get("method") not in training.METHODS:
                raise ExperimentError(f"Expected `adversary.method` to be one of {', '.join(training.METHODS)}. "
                                      f"Received: {where}adversary.method={adversary.get('method')!r}")
            low, high = data.info(config["dataset"]).input_range
            _number(f"{where}adversary.epsilon", adversary.get("epsilon"), low=0, low_open=True, high=high - low)
            try:  # the adversary's own rules (e.g. `noise` only for N-FGSM), before any model trains
                training.AdversarialTraining(input_range=(low, high), **adversary)
            except (TypeError, ValueError) as error:
                raise ExperimentError(f"`{where}adversary` does not build: {error}") from None
        if model.get("seeds") is not None:
            _check_model_seeds(where, model["seeds"], config["seeds"])
        if model.get("distill") is not None:
            _check_distill(where, model, names - {model["name"]}, data.info(config["dataset"]))
            teacher = next((m for m in config["models"] if m["name"] == model["distill"]["teacher"]), None)
            runs = model.get("seeds") or config["seeds"]
            taught = None if teacher is None else teacher.get("seeds") or config["seeds"]
            if "teacher_seed" in model["distill"]:
                _check_teacher_seed(where, model["distill"]["teacher_seed"], teacher, taught, config["seeds"])
            elif taught is not None and not set(runs) <= set(taught):
                raise ExperimentError(f"The teacher {teacher['name']!r} must be trained with every seed of its "
                                      f"student (teacher seeds: {taught}). Received: {where}seeds={runs!r}")
        if model.get("exits") is not None or model.get("neokd") is not None:
            _check_exits(where, model, built)
        if model.get("early_stopping") is not None:
            _check_early_stopping(where, model, config["train"], data.info(config["dataset"]))


def _check_early_stopping(where, model, train, dataset_info):
    """`early_stopping = { examples, steps, collapse }`: an adversarially trained model (an `adversary`, or ARD or
    RSLAD distillation) checked each epoch with PGD on held-out training data; defaults filled in."""
    table = model["early_stopping"]
    if not isinstance(table, dict):
        raise ExperimentError(f"Expected `{where}early_stopping` to be a table. Received: early_stopping={table!r}")
    _unknown(f"{where}early_stopping.", table, _EARLY_STOPPING)
    distill = model.get("distill")
    distilled = distill is not None and distill.get("method", "ard") != "kd"  # ARD and RSLAD attack the student
    if model.get("adversary") is None and not distilled:
        raise ExperimentError(f"`{where}early_stopping` selects epochs by robust accuracy: it needs an adversarially "
                              f"trained model (`adversary`, or ARD/RSLAD `distill`). Received: "
                              f"{where}early_stopping={table!r} on model {model['name']!r} without either")
    if not train.get("validation_fraction") and not dataset_info.native_validation:
        raise ExperimentError(f"`{where}early_stopping` checks held-out training data: `train.validation_fraction` "
                              f"must be above 0. Received: "
                              f"train.validation_fraction={train.get('validation_fraction')!r}")
    for key, value in _EARLY_STOPPING_DEFAULTS.items():
        table.setdefault(key, value)
    _number(f"{where}early_stopping.examples", table["examples"], low=1, integer=True)
    _number(f"{where}early_stopping.steps", table["steps"], low=1, integer=True)
    _number(f"{where}early_stopping.collapse", table["collapse"], low=0, low_open=True, high=1)


def _check_teacher_seed(where, seed, teacher, taught, experiment_seeds):
    """`distill.teacher_seed`: the students of every seed learn from the teacher trained with this seed, which
    must be the experiment's first (seeds run in order, so that teacher exists when the others need it)."""
    if teacher is None:
        raise ExperimentError(f"`{where}distill.teacher_seed` needs a teacher trained in this experiment, not a "
                              f".keras file. Received: {where}distill.teacher_seed={seed!r}")
    if seed != experiment_seeds[0] or seed not in taught:
        raise ExperimentError(f"Expected `{where}distill.teacher_seed` to be the experiment's first seed "
                              f"({experiment_seeds[0]}), one the teacher {teacher['name']!r} is trained with "
                              f"(teacher seeds: {list(taught)}). Received: {where}distill.teacher_seed={seed!r}")


def _check_exits(where, model, backbone):
    """A multi-exit model: `exits = { layers, thresholds }` and optional `neokd = { alpha, beta, attack, ... }`.

    The layer names are checked against the built architecture.
    """
    exits = model.get("exits")
    if exits is None:
        raise ExperimentError(f"`{where}neokd` trains a multi-exit model: add `{where}exits = {{ layers = [...] }}`. "
                              f"Received: {where}exits=None")
    if not isinstance(exits, dict):
        raise ExperimentError(f"Expected `{where}exits` to be a table `{{ layers = [...] }}`. "
                              f"Received: {where}exits={exits!r}")
    _unknown(f"{where}exits.", exits, _EXITS)
    for key in ("jacobian", "distill"):
        if model.get(key):
            raise ExperimentError(f"A multi-exit model cannot also use `{key}`. Received: {where}{key}={model[key]!r}")
    layers = exits.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
        raise ExperimentError(f"Expected `{where}exits.layers` to be a non-empty list of layer names. "
                              f"Received: layers={layers!r}")
    known = [layer.name for layer in backbone.layers]
    for name in layers:
        if name not in known:
            raise ExperimentError(f"Unknown exit layer of {model['architecture']} (layers: {', '.join(known)}). "
                                  f"Received: {where}exits.layers={name!r}")
    if exits.get("head", "dense") not in multiexit.HEADS:
        raise ExperimentError(f"Expected `{where}exits.head` to be one of {', '.join(map(repr, multiexit.HEADS))}. "
                              f"Received: {where}exits.head={exits.get('head')!r}")
    try:  # the order of the exits, and anything else the library refuses, before any model trains
        multiexit.attach_exits(backbone, layers, head=exits.get("head", "dense"))
    except ValueError as error:
        raise ExperimentError(f"`{where}exits` does not build: {error}") from None
    exits.setdefault("thresholds", [0.8, 0.9, 0.95])
    for threshold in exits["thresholds"]:
        _number(f"{where}exits.thresholds", threshold, low=0, high=1, low_open=True)
    neokd = model.get("neokd")
    if neokd is None:
        return
    if not isinstance(neokd, dict):
        raise ExperimentError(f"Expected `{where}neokd` to be a table. Received: neokd={neokd!r}")
    _unknown(f"{where}neokd.", neokd, _NEOKD)
    adversary = model.get("adversary")
    if adversary is None or adversary["method"] == "trades":
        raise ExperimentError(f"NEO-KD trains on adversarial examples: set `{where}adversary` with method 'pgd' or "
                              f"a one-step method. Received: {where}adversary={adversary!r}")
    for key in ("alpha", "beta"):
        if key in neokd:
            _number(f"{where}neokd.{key}", neokd[key], low=0)
    if neokd.get("attack", "average") not in _MULTI_EXIT_TARGETS:
        raise ExperimentError(f"Expected `{where}neokd.attack` to be 'average' or 'max_average'. "
                              f"Received: {where}neokd.attack={neokd.get('attack')!r}")
    weights = neokd.get("exit_weights")
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != len(layers) + 1:
            raise ExperimentError(f"Expected `{where}neokd.exit_weights` to list one weight per exit "
                                  f"({len(layers) + 1}, the last for the backbone). Received: exit_weights={weights!r}")
        for weight in weights:
            _number(f"{where}neokd.exit_weights", weight, low=0)


def _check_teacher_file(where, path, dataset_info):
    """A teacher `.keras` file loads and fits the data set (input shape, one logit per class), before any model
    trains."""
    import keras

    try:
        teacher = keras.saving.load_model(path)
    except Exception as error:  # noqa: BLE001 - a broken or foreign file, an unregistered layer: one line
        raise ExperimentError(f"The teacher file {path} does not load ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]}). Received: {where}={str(path)!r}") from None
    shape, classes = input_shape_of(teacher), classes_of(teacher)
    if shape != tuple(dataset_info.input_shape) or classes != dataset_info.num_classes:
        raise ExperimentError(f"The teacher file {path} takes inputs of shape {shape} and gives {classes} logits; "
                              f"the data set has inputs of shape {tuple(dataset_info.input_shape)} and "
                              f"{dataset_info.num_classes} classes. Received: {where}={str(path)!r}")


def _check_distill(where, model, earlier, dataset_info):
    """A student's `distill` table: a teacher trained earlier in the file (or a `.keras` path) and a method.

    A teacher path is resolved against the working directory and stored absolute.
    """
    spec = model["distill"]
    prefix, where = where, f"{where}distill."
    if not isinstance(spec, dict):
        raise ExperimentError(f"Expected `{where[:-1]}` to be a table. Received: distill={spec!r}")
    _unknown(where, spec, _DISTILL)
    if spec.get("method", "ard") not in distill.METHODS:
        raise ExperimentError(f"Unknown distillation method (allowed: {', '.join(distill.METHODS)}). "
                              f"Received: {where}method={spec.get('method')!r}")
    adversary = model.get("adversary")
    if spec.get("method", "ard") != "kd" and adversary is not None and adversary["method"] == "trades":
        raise ExperimentError(f"A distilled student's adversary crafts the distillation attack ('pgd' or a one-step "
                              f"method). "
                              f"Received: {prefix}adversary.method='trades'")
    if spec.get("method") == "kd" and adversary is not None:
        raise ExperimentError(f"method 'kd' distils on clean inputs: remove the adversary. "
                              f"Received: {prefix}adversary={adversary!r}")
    for key, bounds in (("temperature", {"low": 0, "low_open": True}), ("alpha", {"low": 0, "high": 1})):
        if key in spec:
            _number(f"{where}{key}", spec[key], **bounds)
    if "attack_training" in spec and not isinstance(spec["attack_training"], bool):
        raise ExperimentError(f"Expected `{where}attack_training` to be true or false. "
                              f"Received: {where}attack_training={spec['attack_training']!r}")
    teacher = spec.get("teacher")
    if not isinstance(teacher, str):
        raise ExperimentError(f"Expected `{where}teacher` to name a model. Received: teacher={teacher!r}")
    if teacher.endswith(".keras"):
        path = pathlib.Path(teacher).resolve()
        if not path.is_file():
            raise ExperimentError(f"Teacher model file not found: {path}. Received: {where}teacher={teacher!r}")
        spec["teacher"] = str(path)
        _check_teacher_file(f"{where}teacher", path, dataset_info)
    elif teacher not in earlier:
        raise ExperimentError(f"The teacher must be a model listed before the student, or a .keras file "
                              f"(listed before: {', '.join(sorted(earlier)) or 'none'}). Received: {where}teacher={teacher!r}")


def _check_threat_models(config, input_range):
    threats = config.get("threat_models")
    if not isinstance(threats, dict) or not threats:
        raise ExperimentError(f"Expected a [threat_models.linf] or [threat_models.l2] table. Received: "
                              f"threat_models={threats!r}")
    width = input_range[1] - input_range[0]
    for norm, threat in threats.items():
        if norm not in NORMS:
            raise ExperimentError(f"Unknown threat model (allowed: linf, l2). Received: threat_models.{norm}")
        where = f"threat_models.{norm}."
        if not isinstance(threat, dict):
            raise ExperimentError(f"Expected `threat_models.{norm}` to be a table ([threat_models.{norm}]). "
                                  f"Received: threat_models.{norm}={threat!r}")
        _unknown(where, threat, _THREAT)
        epsilons = threat.get("epsilons")
        if not isinstance(epsilons, list) or not epsilons:
            raise ExperimentError(f"Expected `{where}epsilons` to be a non-empty list. Received: epsilons={epsilons!r}")
        high = width if norm == "linf" else None
        for eps in epsilons:
            _number(f"{where}epsilons", eps, low=0, high=high)
        if len(set(epsilons)) != len(epsilons):
            raise ExperimentError(f"Expected `{where}epsilons` to be distinct. Received: epsilons={epsilons!r}")
        threat["epsilons"] = [float(eps) for eps in epsilons]
        deployed = threat.get("deployed_epsilons")
        if deployed is not None:
            if (not isinstance(deployed, list) or not deployed or len(set(deployed)) != len(deployed)
                    or any(isinstance(e, bool) or e not in threat["epsilons"] for e in deployed)):
                raise ExperimentError(f"Expected `{where}deployed_epsilons` to be a non-empty list of distinct radii "
                                      f"of `{where}epsilons` ({threat['epsilons']}). "
                                      f"Received: deployed_epsilons={deployed!r}")
            threat["deployed_epsilons"] = [float(eps) for eps in deployed]
        threat.setdefault("examples", 1000)
        _number(f"{where}examples", threat["examples"], low=1, integer=True)
        suite = threat.get("attacks")
        if not isinstance(suite, dict) or not suite:
            raise ExperimentError(f"Expected `{where}attacks` to be a non-empty table. Received: attacks={suite!r}")
        for name, spec in suite.items():
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind not in ATTACKS:
                raise ExperimentError(f"Unknown attack type (allowed: {', '.join(ATTACKS)}). "
                                      f"Received: {where}attacks.{name}.type={kind!r}")
            parameters = set(inspect.signature(ATTACKS[kind].__init__).parameters) - {"self", "eps", "input_range"}
            _unknown(f"{where}attacks.{name}.", spec, parameters | {"type"})
            build_attack(spec, norm, epsilons, input_range, config["seed"])  # validates the values
        _check_suite(where, threat, norm, input_range, config)
        _check_multi_exit(where, threat)


def _check_suite(where, threat, norm, input_range, config):
    """`suite = "autoattack" | "autoattack-fast" | "none" | { name, steps, target_classes, queries }`, stored as a table."""
    value = threat.get("suite", "autoattack")
    settings = {"name": value} if isinstance(value, str) else value
    if not isinstance(settings, dict):
        raise ExperimentError(f"Expected `{where}suite` to be a suite name or a table. Received: suite={value!r}")
    _unknown(f"{where}suite.", settings, _SUITE)
    if settings.get("name") not in (*attacks.SUITES, "none"):
        raise ExperimentError(f"Unknown suite (allowed: {', '.join(attacks.SUITES)}, none). "
                              f"Received: {where}suite.name={settings.get('name')!r}")
    threat["suite"] = settings
    try:
        build_suite(settings, norm, threat["epsilons"], input_range, data.info(config["dataset"]).num_classes,
                    config["seed"])
    except ValueError as error:
        raise ExperimentError(f"In {where}suite: {error}") from None


def build_suite(settings, norm, epsilons, input_range, num_classes, seed):
    """The `Cascade` of a threat model's `suite` table, or None for "none"."""
    if settings["name"] == "none":
        return None
    options = {k: v for k, v in settings.items() if k != "name"}
    return attacks.suite(settings["name"], list(epsilons), norm=norm, input_range=tuple(input_range),
                         num_classes=num_classes, seed=seed, **options)


def _check_multi_exit(where, threat):
    """`multi_exit = { steps, targets }`: the PGD attacks on every exit of multi-exit models."""
    settings = threat.setdefault("multi_exit", {})
    if not isinstance(settings, dict):
        raise ExperimentError(f"Expected `{where}multi_exit` to be a table. Received: multi_exit={settings!r}")
    _unknown(f"{where}multi_exit.", settings, _MULTI_EXIT)
    settings.setdefault("steps", 20)
    _number(f"{where}multi_exit.steps", settings["steps"], low=1, integer=True)
    settings.setdefault("targets", list(_MULTI_EXIT_TARGETS))
    targets = settings["targets"]
    if not isinstance(targets, list) or not targets or any(t not in _MULTI_EXIT_TARGETS for t in targets):
        raise ExperimentError(f"Expected `{where}multi_exit.targets` to be a non-empty list of 'average' and "
                              f"'max_average'. Received: targets={targets!r}")


def select_models(config, names):
    """The experiment restricted to the named models (in file order), e.g. one stage of a two-stage transfer.

    A selected student whose teacher is not selected loads the teacher from
    `<out>/models/<teacher>.keras`, trained by an earlier run or copied there.
    The run's report also lists the other models' results found in `<out>`
    (`defined_models` keeps their order).

    Args:
        config: the `specs.Experiment`.
        names: model names.

    Returns:
        A `specs.Experiment`.

    Raises:
        ExperimentError: a name the experiment does not define.
    """
    known = [m.name for m in config.models]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ExperimentError(f"Unknown model (defined: {', '.join(known)}). Received: models={','.join(names)!r}")
    return config.with_models(names)


def build_attack(spec, norm, epsilons, input_range, seed):
    """The attack object of one `[threat_models.<norm>.attacks.<name>]` entry."""
    cls = ATTACKS[spec["type"]]
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    if "norm" in kwargs and kwargs["norm"] != norm:  # the column would name one threat model and measure another
        raise ExperimentError(f"An attack's norm comes from its threat model ([threat_models.{norm}]): remove its "
                              f"`norm`. Received: {spec['type']} with norm={kwargs['norm']!r}")
    if "norm" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("norm", norm)
    elif _ONLY_NORM.get(spec["type"], norm) != norm:
        raise ExperimentError(f"{spec['type']} supports only the {_ONLY_NORM[spec['type']]} threat model. "
                              f"Received: threat_models.{norm}")
    kwargs.setdefault("seed", seed)
    try:
        return cls(list(epsilons), input_range=tuple(input_range), **kwargs)
    except ValueError as error:
        raise ExperimentError(f"In attack {spec['type']}: {error}") from None


def load(path, profile=None):
    """Reads, merges and validates an experiment file.

    Args:
        path: the TOML file.
        profile: name of a `[profiles.<name>]` table merged over the base, or None.

    Returns:
        The experiment's frozen `specs.Experiment` (defaults filled in, `profile` set).

    Raises:
        ExperimentError: unknown keys, unknown attack types or models,
            epsilons out of range, or an unknown profile.
        FileNotFoundError: no such file.
    """
    raw, sweeps = _read(path, profile)
    config = _experiment(raw, path, profile)
    _check_sweeps(sweeps, raw, path, profile)
    return config


def _check_sections(where, table):
    """`train`, `export` and `threat_models`, where `table` (the file, or a profile at `where`) has them, are tables."""
    for key in ("train", "export", "threat_models"):
        if key in table and not isinstance(table[key], dict):
            raise ExperimentError(f"Expected `{where}{key}` to be a table ([{where}{key}]). "
                                  f"Received: {where}{key}={table[key]!r}")


def _read(path, profile):
    """`(raw, sweeps)`: the experiment file's tables with the profile merged in, and its `[[sweeps]]`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No experiment file at {str(path)!r}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ExperimentError(f"{path}: not valid TOML: {error}") from None
    _unknown("", raw, _TOP)
    profiles = raw.pop("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(table, dict) for table in profiles.values()):
        raise ExperimentError("Expected `profiles` to hold tables ([profiles.<name>]). Received: profiles="
                              + repr(profiles if not isinstance(profiles, dict) else
                                     {k: v for k, v in profiles.items() if not isinstance(v, dict)}))
    for name, table in profiles.items():  # every profile, not only the one asked for: a broken one is found now
        _unknown(f"profiles.{name}.", table, _TOP - {"profiles"})
        _check_sections(f"profiles.{name}.", table)
        if "models" in table and not (isinstance(table["models"], list)
                                      and all(isinstance(m, dict) for m in table["models"])):
            raise ExperimentError(f"Expected `profiles.{name}.models` to be a list of model tables. "
                                  f"Received: profiles.{name}.models={table['models']!r}")
    if profile is not None:
        _check_name("profile", profile)  # it names the default output folder
        if profile not in profiles:
            raise ExperimentError(f"Unknown profile (defined: {', '.join(sorted(profiles)) or 'none'}). "
                                  f"Received: profile={profile!r}")
        raw = _merge(raw, _with_suites_replaced(raw, profiles[profile], profile))
    sweeps = raw.pop("sweeps", [])
    return raw, sweeps


def _experiment(raw, path, profile):
    """The validated `specs.Experiment` of merged experiment tables."""
    path = pathlib.Path(path)
    raw = copy.deepcopy(raw)
    _check_sections("", raw)
    config = _merge(_DEFAULTS, raw)
    config["profile"] = profile
    config.setdefault("name", path.stem)
    _check_name("name", config["name"])
    if not isinstance(config.get("description", ""), str):
        raise ExperimentError(f"Expected `description` to be a string. Received: description={config['description']!r}")
    if config.get("dataset") not in data.NAMES:
        raise ExperimentError(f"Unknown dataset (allowed: {', '.join(data.NAMES)}). "
                              f"Received: dataset={config.get('dataset')!r}")
    seeds = config["seed"] if isinstance(config["seed"], list) else [config["seed"]]
    if not _distinct_seeds(seeds):
        raise ExperimentError(f"Expected `seed` to be an integer or a non-empty list of distinct integers. "
                              f"Received: seed={config['seed']!r}")
    for seed in seeds:
        _number("seed", seed, low=0, high=2 ** 32 - 1, integer=True)  # NumPy's and Keras' seeds are 32-bit
    config["seeds"], config["seed"] = seeds, seeds[0]
    _unknown("train.", config["train"], _TRAIN)
    if not isinstance(config["train"]["augment"], bool):
        raise ExperimentError(f"Expected `train.augment` to be true or false. "
                              f"Received: train.augment={config['train']['augment']!r}")
    _number("train.epochs", config["train"]["epochs"], low=0, integer=True)
    _number("train.batch_size", config["train"]["batch_size"], low=1, integer=True)
    _number("train.learning_rate", config["train"]["learning_rate"], low=0, low_open=True)
    if config["train"]["limit"] is not None:
        _number("train.limit", config["train"]["limit"], low=1, integer=True)
    if config["train"]["distribute"] not in (None, *distribute.KINDS):
        raise ExperimentError(f"Expected `train.distribute` to be one of {', '.join(map(repr, distribute.KINDS))} "
                              f"(or absent: one device). Received: train.distribute={config['train']['distribute']!r}")
    _check_recipe(config["train"])
    _unknown("export.", config["export"], _EXPORT)
    for key in ("enabled", "compress"):
        if not isinstance(config["export"][key], bool):
            raise ExperimentError(f"Expected `export.{key}` to be true or false. "
                                  f"Received: export.{key}={config['export'][key]!r}")
    for key in ("calibration_size", "parity_examples", "deployed_examples", "deployed_queries"):
        if config["export"][key] is not None:  # deployed_examples: None until the threat models are known
            _number(f"export.{key}", config["export"][key], low=1, integer=True)
    limit = config["export"]["arena_limit"]
    if limit == "none":  # the smallest flash, whatever the arena
        config["export"]["arena_limit"] = limit = None
    try:
        export.compress.check_arena_limit(limit)
    except ValueError:
        raise ExperimentError("Expected `export.arena_limit` to be a number >= 1 (the largest TFLite Micro arena of a "
                              "compressed file, as a multiple of the int8 file's) or \"none\" (the smallest flash). "
                              f"Received: export.arena_limit={limit!r}") from None
    if not config["export"]["compress"]:
        config["export"]["arena_limit"] = None  # only compressed files have kernels to group
    if not isinstance(config["export"]["deployed_attacks"], list):
        raise ExperimentError("Expected `export.deployed_attacks` to be a list (of transfer, square, hopskipjump). "
                              f"Received: export.deployed_attacks={config['export']['deployed_attacks']!r}")
    for attack in config["export"]["deployed_attacks"]:
        if attack not in _DEPLOYED_ATTACKS:
            raise ExperimentError(f"Unknown deployed attack (allowed: {', '.join(_DEPLOYED_ATTACKS)}). "
                                  f"Received: export.deployed_attacks={attack!r}")
    if "hopskipjump" in config["export"]["deployed_attacks"]:
        try:
            attacks.HopSkipJump(queries=config["export"]["deployed_queries"])
        except ValueError as error:
            raise ExperimentError(f"In export.deployed_queries for the deployed HopSkipJump: {error}") from None
    _check_models(config)
    _check_threat_models(config, data.info(config["dataset"]).input_range)
    fewest = min(threat["examples"] for threat in config["threat_models"].values())
    if config["export"]["deployed_examples"] is None:  # default: 100, or every example of the smallest threat model
        config["export"]["deployed_examples"] = min(100, fewest)
    elif config["export"]["enabled"] and config["export"]["deployed_examples"] > fewest:
        raise ExperimentError(f"`export.deployed_examples` asks for more examples than a threat model evaluates "
                              f"({fewest}; the deployed model is attacked on the first of those). "
                              f"Received: export.deployed_examples={config['export']['deployed_examples']}")
    return Experiment.from_dict(config)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One `[[sweeps]]` entry, built: the candidates of one model, to be selected on the validation split.

    Attributes:
        model: the swept model's name.
        select: "clean" (best clean accuracy), "robust" (best PGD accuracy at `epsilon`) or
            "robust_with_clean" (best PGD accuracy among candidates with clean accuracy at least `min_clean`;
            the best clean one when none qualifies).
        epsilon: the validation attack's radius (robust selections).
        min_clean: the clean floor of "robust_with_clean".
        examples: validation examples attacked (the clean accuracy uses the whole validation split).
        steps: steps of the validation PGD.
        grid: `{dotted key: [values]}` as written.
        candidates: one `(settings, experiment)` per point of the grid, in grid order: `settings` maps each
            dotted key to its value; `experiment` is a validated `specs.Experiment` whose last model is the
            candidate (named `<model>__<k>`, k from 1) after the teachers it needs.
    """

    model: str
    select: str
    epsilon: float
    min_clean: float
    examples: int
    steps: int
    grid: dict
    candidates: tuple


def load_sweeps(path, profile=None):
    """The experiment file's `[[sweeps]]`, each built into its validated candidates.

    A sweep varies settings of one model entry (`"jacobian.input"`,
    `"distill.temperature"`, `"neokd.alpha"`, `"adversary.epsilon"`, ...) or of
    the recipe (`"train.epochs"`, `"train.learning_rate"`) over the Cartesian
    product of its `grid`; `tinyrobust sweep` trains every candidate and
    selects one by its accuracy on the validation split, never the test split.

    Args:
        path: the experiment file.
        profile: the profile merged in, or None.

    Returns:
        A list of `Sweep`.

    Raises:
        ExperimentError: a malformed sweep, or a candidate the experiment's rules refuse (naming it).
    """
    raw, sweeps = _read(path, profile)
    _experiment(raw, path, profile)
    return _check_sweeps(sweeps, raw, path, profile)


def _set_dotted(table, dotted, value):
    keys = dotted.split(".")
    for key in keys[:-1]:
        if not isinstance(table.get(key), dict):
            table[key] = {}
        table = table[key]
    table[keys[-1]] = value


def _teachers_of(models, name):
    """The names of the models `name` distils from, nearest last, that the file defines."""
    by_name = {m.get("name"): m for m in models}
    chain, current = [], by_name.get(name)
    while current is not None and isinstance(current.get("distill"), dict):
        teacher = current["distill"].get("teacher")
        if teacher not in by_name or teacher in chain:
            break
        chain.insert(0, teacher)
        current = by_name[teacher]
    return chain


def _check_sweeps(sweeps, raw, path, profile):
    if not isinstance(sweeps, list) or not all(isinstance(s, dict) for s in sweeps):
        raise ExperimentError(f"Expected `sweeps` to be an array of tables ([[sweeps]]). Received: sweeps={sweeps!r}")
    built = []
    names = [m.get("name") for m in raw.get("models", [])]
    for i, entry in enumerate(sweeps):
        where = f"sweeps[{i}]."
        _unknown(where, entry, _SWEEP)
        entry = {**_SWEEP_DEFAULTS, **entry}
        if entry.get("model") not in names:
            raise ExperimentError(f"`{where}model` must name a model of the file (models: {', '.join(map(str, names))})."
                                  f" Received: {where}model={entry.get('model')!r}")
        if entry["select"] not in SELECTIONS:
            raise ExperimentError(f"Expected `{where}select` to be one of {', '.join(map(repr, SELECTIONS))}. "
                                  f"Received: {where}select={entry['select']!r}")
        low, high = data.info(raw.get("dataset")).input_range if raw.get("dataset") in data.NAMES else (0.0, 1.0)
        if entry["select"] != "clean":
            _number(f"{where}epsilon", entry.get("epsilon"), low=0, low_open=True, high=high - low)
        if entry["select"] == "robust_with_clean":
            _number(f"{where}min_clean", entry["min_clean"], low=0, high=1)
        elif entry["min_clean"] is not None:
            raise ExperimentError(f"`{where}min_clean` is the clean floor of select = 'robust_with_clean'. "
                                  f"Received: {where}min_clean={entry['min_clean']!r}, select={entry['select']!r}")
        _number(f"{where}examples", entry["examples"], low=1, integer=True)
        _number(f"{where}steps", entry["steps"], low=1, integer=True)
        grid = entry.get("grid")
        if not isinstance(grid, dict) or not grid:
            raise ExperimentError(f"Expected `{where}grid` to be a table of dotted keys and value lists. "
                                  f"Received: {where}grid={grid!r}")
        for key, values in grid.items():
            head, _, rest = key.partition(".")
            if not (head in _SWEEPABLE or (head == "train" and rest in _TRAIN and "." not in rest)):
                raise ExperimentError(f"`{where}grid` varies a model's {', '.join(sorted(_SWEEPABLE))} or a "
                                      f"`train.<key>`. Received: {where}grid.{key!r}")
            if not isinstance(values, list) or not values:
                raise ExperimentError(f"Expected `{where}grid.{key}` to be a non-empty list of values. "
                                      f"Received: {where}grid.{key}={values!r}")
        model = next(m for m in raw["models"] if m.get("name") == entry["model"])
        teachers = [copy.deepcopy(m) for m in raw["models"] if m.get("name") in _teachers_of(raw["models"],
                                                                                              entry["model"])]
        keys = list(grid)
        candidates = []
        for k, values in enumerate(itertools.product(*(grid[key] for key in keys)), start=1):
            settings = dict(zip(keys, values))
            candidate, experiment = copy.deepcopy(model), copy.deepcopy(raw)
            candidate["name"] = f"{entry['model']}__{k}"
            for key, value in settings.items():
                _set_dotted(experiment if key.startswith("train.") else candidate, key, value)
            experiment["models"] = [*teachers, candidate]
            try:
                candidates.append((settings, _experiment(experiment, path, profile)))
            except ExperimentError as error:
                raise ExperimentError(f"`{where}grid` candidate {k} {settings}: {error}") from None
        built.append(Sweep(entry["model"], entry["select"], float(entry.get("epsilon") or 0.0), entry["min_clean"],
                           entry["examples"], entry["steps"], grid, tuple(candidates)))
    return built
