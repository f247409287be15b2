"""Runs an experiment: the loop over seeds, models and threat models that calls the stages and writes results.

Only this module sees the whole experiment: it computes every model's
settings (teachers' fingerprints included), checks the run folder before any
work, and hands each stage (`tinyrobust.bench.stages`) its own spec.
"""

import os
import pathlib
import platform
import time
import warnings

import keras
import numpy as np

from tinyrobust import data, export, files, multiexit
from tinyrobust.bench import fingerprints, per_example, stages
from tinyrobust.bench import results as results_lib
from tinyrobust.bench.config import ExperimentError
from tinyrobust.bench.run_folder import RunFolder, read_reusable
from tinyrobust.footprint import summary

# MLPerf Tiny quality targets (top-1 accuracy of the reference int8 models).
QUALITY_TARGETS = {("cifar10", "resnet8"): 0.85, ("speech_commands", "dscnn"): 0.90}


def versions():
    """Versions of the packages that decide the numbers."""
    import qkeras
    import tensorflow as tf

    import tinyrobust

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "qkeras": getattr(qkeras, "__version__", "unknown"), "numpy": np.__version__,
            "tinyrobust": tinyrobust.__version__, "tflite_micro": export.compress.TFLITE_MICRO_VERSION}


_ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")  # what picks CPU kernels


def machine():
    """The host that wrote a result: its CPU, the cores this process may use and the operating system.

    Two hosts can give different last digits for the same settings (their CPU
    kernels differ) and very different wall times, so every result names its host.

    Returns:
        `{"cpu", "cpu_id", "isa", "cores", "system"}`; `cpu_id` (family, model,
        stepping) and `isa` (the vector extensions among `_ISA_FLAGS`) come from
        `/proc/cpuinfo` and are null / empty where it does not exist.
    """
    info = {}
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    cpu_id = (f"family {info['cpu family']} model {info['model']} stepping {info.get('stepping', '?')}"
              if "cpu family" in info and "model" in info else None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(), "cpu_id": cpu_id,
            "isa": [f for f in _ISA_FLAGS if f in flags], "cores": int(cores or 1), "system": platform.platform()}


def _teacher_fingerprint(config, spec, folder, known):
    """The fingerprint of the teacher of the student `spec` (None without distillation): of its `.keras` file
    when the file names a path, else of its train record, else of its settings in this experiment."""
    name = spec.distill["teacher"]
    if name.endswith(".keras"):
        return "sha256:" + fingerprints.file_digest(pathlib.Path(name))
    teachers = folder.teacher_folder(spec, config.seed)
    record = teachers.reusable(teachers.train_record(name))
    if record is not None and "fingerprint" in record:
        return record["fingerprint"]
    if teachers.path != folder.path:  # another seed's teacher, trained later in this run
        return f"{name} of seed {spec.distill['teacher_seed']}, not trained yet"
    teacher_spec = config.model(name)
    return None if teacher_spec is None else fingerprints.fingerprint(_model_settings(config, teacher_spec, folder,
                                                                                      known))


def _model_settings(config, spec, folder, known=None):
    """The settings that decide the trained model `spec` (its teacher's fingerprint included); `known` caches
    them by name."""
    known = {} if known is None else known
    if spec.name not in known:
        teacher = _teacher_fingerprint(config, spec, folder, known) if spec.distill else None
        known[spec.name] = fingerprints.model_settings(config.dataset, config.seed, config.train, spec, versions(),
                                                       teacher, data.digest(config.dataset))
    return known[spec.name]


def model_settings(config, folder):
    """`{model name: the settings that decide it}` for every model of one seed's experiment `config` run in
    `folder` (a `RunFolder` or a path), in the experiment's order.

    Args:
        config: the experiment (one seed).
        folder: its run folder.

    Returns:
        A dict of JSON-serialisable dicts (`fingerprints.model_settings`).
    """
    folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    known = {}
    return {spec.name: _model_settings(config, spec, folder, known) for spec in config.models}


def _check_sizes(config):
    """Every size the experiment asks for fits its split (nothing is silently cut to fit).

    Raises:
        ExperimentError: naming the key, its value and the split's size.
    """
    name, fraction = config.dataset, config.train.validation_fraction
    train = len(data.load_raw(name, "train", validation_fraction=fraction, seed=config.seed)[1])
    test = len(data.load_raw(name, "test")[1])
    asked = [("train.limit", config.train.limit, train, "the train split holds"),
             ("export.calibration_size", config.export.calibration_size, train, "the train split holds")]
    asked += [(f"threat_models.{norm}.examples", threat.examples, test, "the test split holds")
              for norm, threat in config.threat_models.items()]
    if config.export.enabled:
        asked.append(("export.parity_examples", config.export.parity_examples, test, "the test split holds"))
    stopping = [(i, m) for i, m in enumerate(config.models) if m.early_stopping]
    if stopping:
        held_out = len(data.load_raw(name, "validation", validation_fraction=fraction, seed=config.seed)[1])
        asked += [(f"models[{i}].early_stopping.examples", m.early_stopping["examples"], held_out,
                   "the validation split holds") for i, m in stopping]
    for key, value, size, what in asked:
        if value is not None and value > size:
            raise ExperimentError(f"`{key}` asks for more examples than {what} ({size:,}). Received: {key}={value}")


def _prepare_folder(config, folder, fresh, say):
    """Before any work: `--fresh` deletes the models' earlier work in `folder`, otherwise work made with other
    settings stops the run (`RunFolder.check_earlier_work`)."""
    if fresh:
        folder.delete_earlier_work(config.models, say)
    else:
        folder.check_earlier_work(model_settings(config, folder))


class _Say:
    def __init__(self, verbose):
        self.verbose = verbose

    def __call__(self, message):
        if self.verbose:
            print(message, flush=True)


def train(config, spec, out, verbose=True):
    """Trains one model of one seed's experiment in `out`, or loads it (`stages.train_model`).

    Returns:
        (model, seconds spent training it, earlier interrupted runs included;
        0.0 when it was loaded).
    """
    folder = RunFolder(out)
    trained = stages.train_model(spec, config.train, config.dataset, config.seed, folder,
                                 model_settings(config, folder)[spec.name], verbose)
    return trained.model, trained.seconds


def _footprint(model):
    footprint = summary(model, print_fn=None)
    bits = {row.name: row.bits for row in footprint.layers if row.bits}
    return footprint, bits


def run(config, out_dir, command="", verbose=True, fresh=False):
    """Runs a validated experiment (see `tinyrobust.bench.config.load`).

    Every artifact records the settings that produced it and their
    fingerprint (`tinyrobust.bench.fingerprints`). A step is skipped when its
    output exists with the current settings, so an interrupted run resumes
    where it stopped: trained models (`models/`, and unfinished training in
    `checkpoints/`), exports and deployed-model evaluations (`export/`) and
    result files (`results/`). Exports, deployed evaluations and results made
    with other settings are redone; trained models and checkpoints made with
    other settings stop the run before any work (`fresh=True` deletes them).
    With several seeds (`seed = [0, 1, 2]`), each seed runs in
    `out_dir/seed_<seed>/` and the report gives the mean and standard
    deviation over seeds.

    Args:
        config: the experiment (`specs.Experiment` from `config.load`).
        out_dir: output folder.
        command: the command line, recorded in every result.
        verbose: print progress.
        fresh: delete every artifact of the experiment's models in `out_dir`
            first and start them over.

    Returns:
        The list of result dicts (one per seed, model and threat model).

    Raises:
        ExperimentError: `out_dir` holds models or checkpoints trained with
            other settings (and `fresh` is False).
    """
    say = _Say(verbose)
    out = RunFolder(out_dir)
    with out.lock():
        seeds = list(config.seeds)
        _check_sizes(config)
        folders = {seed: out if len(seeds) == 1 else RunFolder(out.path / f"seed_{seed}") for seed in seeds}
        for seed, folder in folders.items():  # before any work
            _prepare_folder(config.with_seed(seed), folder, fresh, say)
        files.write_json(out.path / "experiment.json", config.to_dict())
        all_results = []
        for seed in seeds:
            if len(seeds) > 1:
                say(f"seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})")
            all_results += _run_seed(config.with_seed(seed) if len(seeds) > 1 else config, folders[seed], command, say)
        write_report(_with_earlier_results(all_results, out.path, config, seeds), out.path)
    return all_results


def train_all(config, out_dir, verbose=True, fresh=False):
    """Trains (or reuses) every model of one seed's experiment in `out_dir`, and evaluates nothing.

    The run folder is locked and checked as `run` does: trained models and
    checkpoints made with other settings stop it before any work, unless
    `fresh` deletes them. `tinyrobust sweep` trains its candidates this way.

    Args:
        config: the experiment (one seed).
        out_dir: output folder.
        verbose: print progress.
        fresh: delete the models' earlier work first.

    Returns:
        `{name: (model, training seconds)}` in the experiment's order (the student or the network a
        distiller or NEO-KD trainer trains).
    """
    say = _Say(verbose)
    folder = RunFolder(out_dir)
    trained = {}
    with folder.lock():
        _prepare_folder(config, folder, fresh, say)
        settings = model_settings(config, folder)
        for spec in config.models:
            say(f"{spec.name}: training {spec.architecture} ({spec.quantization}) on {config.dataset}")
            model = stages.train_model(spec, config.train, config.dataset, config.seed, folder, settings[spec.name],
                                       verbose)
            trained[spec.name] = (model.model, model.seconds)
    return trained


def _with_earlier_results(results, out, config, seeds):
    """`results` plus the results in `out` of the experiment's models not run now (an earlier `--models` stage).

    Only files of the same experiment, profile and seeds and of models the
    experiment defines count (a stale file of a renamed model does not).
    Models come in the experiment file's order.
    """
    order = list(config.defined_models or [m.name for m in config.models])
    names = {r["model"]["name"] for r in results}
    try:
        found = results_lib.read_all(out)
    except FileNotFoundError:
        found = []
    earlier = [r for r in found if r["model"]["name"] in order and r["model"]["name"] not in names
               and r["experiment"] == config.name and r["profile"] == config.profile and r["seed"] in seeds]
    return sorted(results + earlier, key=lambda r: order.index(r["model"]["name"]))


def _reused_result(path, settings, say):
    """The result file at `path` when it was made with `settings` and reads as a valid, internally consistent
    result, else None (it is redone)."""
    result = read_reusable(path)
    if result is None:
        return None
    try:
        results_lib.validate(result)
    except ValueError as error:
        warnings.warn(f"{path} is not a valid result ({error}); it is redone.", stacklevel=2)
        return None
    if result.get("fingerprint") != fingerprints.fingerprint(settings):
        changed = fingerprints.changes({k: v for k, v in (result.get("settings") or {}).items() if k != "model_settings"}
                                       if result.get("settings") else None, settings)
        say(f"{path.name} came from other settings ({'; '.join(changed[:4])}); it is redone")
        return None
    return result


def _quality_target(target, test_accuracy):
    """The `quality_target` record for MLPerf Tiny's `target` (or None), judged on the whole test split."""
    if target is None:
        return None
    return {"metric": "test_accuracy", "target": target, "met": test_accuracy["accuracy"] >= target}


def _with_test_accuracy(result, test_accuracy, path):
    """`result` (from before `test_accuracy`) with it added and its quality target judged on it, rewritten at `path`.

    Nothing else changes: the attacks are not redone.
    """
    result = {**result, "test_accuracy": test_accuracy}
    if result.get("quality_target") is not None:
        result["quality_target"] = _quality_target(result["quality_target"]["target"], test_accuracy)
    results_lib.write(result, path)
    return result


def _run_seed(config, folder, command, say):
    """Trains, exports and attacks every model with one seed in the `RunFolder` `folder`; returns the result
    dicts. Each model goes through the stages train -> export (once) -> per threat model: evaluate, deployed,
    multi-exit; artifacts with their settings are reused, results from before `test_accuracy` gain it."""
    verbose = say.verbose
    folder.path.mkdir(parents=True, exist_ok=True)
    dataset_info = data.info(config.dataset)
    examples = max(t.examples for t in config.threat_models.values())
    x_split, y_split = data.load_arrays(config.dataset, "test")  # the whole split, for `test_accuracy`
    x_test, y_test = x_split[:examples], y_split[:examples]  # the attacked examples
    all_settings = model_settings(config, folder)
    all_results = []
    for spec in config.models:
        settings_of_model = all_settings[spec.name]
        model_fingerprint = fingerprints.fingerprint(settings_of_model)
        settings = {norm: fingerprints.result_settings(threat, config.export, model_fingerprint, versions())
                    for norm, threat in config.threat_models.items()}
        existing = {norm: _reused_result(folder.result(spec.name, norm), settings[norm], say)
                    for norm in config.threat_models}
        # Results from before `test_accuracy` gain it from the saved model; without that file they stay as they are.
        backfill = [n for n, r in existing.items() if r is not None and r.get("test_accuracy") is None]
        if not folder.model(spec.name).is_file():
            backfill = []
        if all(r is not None for r in existing.values()) and not backfill:
            say(f"{spec.name}: results exist with these settings, skipped")
            all_results += list(existing.values())
            continue
        say(f"{spec.name}: training {spec.architecture} ({spec.quantization}) on {config.dataset}")
        trained = stages.train_model(spec, config.train, config.dataset, config.seed, folder, settings_of_model,
                                     verbose)
        train_record = folder.reusable(folder.train_record(spec.name))
        train_seconds = train_record.get("seconds") if train_record else None
        model, network = trained.model, None
        if spec.exits:  # attacks, checks and export see the final exit; `multi_exit` covers every exit
            network, model = model, multiexit.final_exit(model, name=f"{spec.name}_final")
        footprint, bits = _footprint(network or model)
        attacked = export.fold_quantized_weights(model)  # the same outputs, weight quantizers evaluated once
        test_accuracy, test_correct = stages.test_accuracy(attacked, x_split, y_split)
        pending = [norm for norm in config.threat_models if existing[norm] is None]
        for norm in config.threat_models:
            if norm in backfill:
                path = folder.result(spec.name, norm)
                say(f"  {spec.name}: {path.name} gains its accuracy on the whole test split "
                    f"({100 * test_accuracy['accuracy']:.2f}%); its attacks are not redone")
                existing[norm] = _with_test_accuracy(existing[norm], test_accuracy, path)
        deployed_reused = {norm: _reused_deployed(folder.deployed(spec.name, norm), settings[norm])
                           for norm in pending} if config.export.enabled else {}
        exported = None
        if any(record is None for record in deployed_reused.values()):  # the export stage, once per model
            exported = stages.export_model(
                model, spec, config.export, config.dataset, config.seed, folder,
                fingerprints.export_settings(config.export, model_fingerprint, versions()), verbose)
        export_seconds = exported.seconds if exported is not None else 0.0
        for norm, threat in config.threat_models.items():
            if existing[norm] is not None:
                all_results.append(existing[norm])
                continue
            n = threat.examples
            x, y = x_test[:n], y_test[:n]
            evaluation = stages.evaluate(attacked, model, x, y, threat, dataset_info, config.seed, spec.name, verbose)
            deployed, seconds = None, {"export": None, "deployed": None}
            if config.export.enabled:
                start = time.perf_counter()
                deployed = deployed_reused[norm]
                if deployed is None:
                    deployed = {**stages.evaluate_deployed(exported, attacked, evaluation.cascade, x, y, threat,
                                                           config.export, dataset_info.input_range, config.seed,
                                                           spec.name, verbose),
                                "fingerprint": fingerprints.fingerprint(settings[norm])}
                    files.write_json(folder.deployed(spec.name, norm), deployed)
                seconds = {"export": export_seconds, "deployed": time.perf_counter() - start}
                export_seconds = 0.0  # the files are exported once, before the first threat model
            multi_exit = None
            if network is not None:
                say(f"  {spec.name}: every exit under {', '.join(threat.multi_exit['targets'])} PGD-"
                    f"{threat.multi_exit['steps']}, early exit at thresholds {spec.exits['thresholds']}")
                multi_exit = stages.evaluate_exits(network, x, y, threat, spec.exits["thresholds"],
                                                   dataset_info.input_range, config.seed)
            result = _result(config, spec, threat, evaluation, footprint, bits, test_accuracy, test_correct, deployed,
                             multi_exit, train_record, {"train": train_seconds, "evaluate": evaluation.seconds,
                                                        **seconds}, settings[norm], settings_of_model, command)
            results_lib.write(result, folder.result(spec.name, norm))
            all_results.append(result)
        keras.backend.clear_session()
    return all_results


def _reused_deployed(path, settings):
    """The deployed record at `path` when it was made with the result settings `settings`, else None."""
    record = read_reusable(path)
    return record if record is not None and record.get("fingerprint") == fingerprints.fingerprint(settings) else None


def _result(config, spec, threat, evaluation, footprint, bits, test_accuracy, test_correct, deployed, multi_exit,
            train_record, wall_time, settings, settings_of_model, command):
    """One result file's dict, composed from the stages' records (`tinyrobust.bench.schema.Result`)."""
    report = evaluation.report
    accuracy = report.accuracy()
    target = QUALITY_TARGETS.get((config.dataset, spec.architecture))
    entry = spec.to_dict()
    return {
        "schema_version": results_lib.SCHEMA_VERSION, "experiment": config.name,
        "profile": config.profile, "dataset": config.dataset, "seed": config.seed,
        "command": command, "versions": versions(), "machine": machine(),
        "model": {"name": spec.name, "architecture": spec.architecture,
                  "quantization": spec.quantization, "options": entry["options"],
                  "jacobian": entry.get("jacobian") or {}, "adversary": entry.get("adversary"),
                  "distill": entry.get("distill"), "exits": entry.get("exits"), "neokd": entry.get("neokd"),
                  "early_stopping": entry.get("early_stopping"),
                  "params": footprint.params, "int8_bytes": footprint.int8_bytes,
                  "packed_bytes": footprint.packed_bytes, "bits": bits},
        "threat_model": {"norm": threat.norm, "epsilons": list(threat.epsilons), "examples": evaluation.examples},
        "clean_accuracy": accuracy["clean"], "test_accuracy": test_accuracy,
        "robust_accuracy": accuracy["attacks"],
        "worst_case": accuracy["worst"],
        "queries": {a: {str(e): float(q) for e, q in per.items()} for a, per in report.queries.items()},
        "attack_kinds": report.kinds, "checks": evaluation.checks.flags,
        "quality_target": _quality_target(target, test_accuracy),
        "deployed": deployed, "multi_exit": multi_exit,
        "early_stopping": (train_record or {}).get("early_stopping"),
        "wall_time_s": wall_time,
        "settings": {**settings, "model_settings": settings_of_model},
        "fingerprint": fingerprints.fingerprint(settings),
        "per_example": {**per_example.record(report.clean, report.worst),
                        "test_split": per_example.pack(test_correct)},
    }


def write_report(all_results, out):
    """Writes `report.md` and `plots/*.png` from result dicts; returns the report path."""
    out = pathlib.Path(out)
    plots = results_lib.plots(all_results, out / "plots")
    plots += results_lib.training_curves(out, out / "plots")
    text = results_lib.table(all_results, wide=True)
    text += "\nPlots: " + ", ".join(str(p.relative_to(out)) for p in plots) + "\n"
    commands = sorted({r["command"] for r in all_results if r["command"]})
    if commands:
        text += "\nCommand: " + "; ".join(f"`{c}`" for c in commands) + "\n"
    files.write_atomically(out / "report.md", text)
    return out / "report.md"
