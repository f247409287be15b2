"""Runs an experiment: train (resuming), attack, check, export, evaluate the deployed model, write results."""

import hashlib
import json
import os
import pathlib
import platform
import shutil
import sys
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from tinyrobust import attacks, callbacks, data, distill, distribute, export, files, models, multiexit, quantizers
from tinyrobust.attacks.base import labels_of, predict
from tinyrobust.bench import fingerprints, per_example
from tinyrobust.bench import results as results_lib
from tinyrobust.bench.config import ExperimentError, build_attack, build_suite, jacobian_settings
from tinyrobust.footprint import summary
from tinyrobust.jacobian import JacobianRegularizer
from tinyrobust.training import AdversarialTraining, RobustModel

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


def _reusable(path, read=None):
    """The artifact at `path` read by `read` (default: JSON), or None when it is missing or corrupt.

    A corrupt file (truncated JSON, a broken `.keras`) is named in a warning and
    removed, so the step that writes it runs again.
    """
    if not path.is_file():
        return None
    try:
        return read(path) if read is not None else json.loads(path.read_text())
    except Exception as error:  # noqa: BLE001 - any failure to read means: redo
        warnings.warn(f"{path} is corrupt ({type(error).__name__}: {str(error)[:200]}); it is redone.", stacklevel=2)
        path.unlink()
        return None


def _teacher_folder(config, spec, out):
    """The run folder whose `models/` holds the teacher of the student `spec`: the seed's own folder `out`, or
    with `distill.teacher_seed` (one teacher for the students of every seed) that seed's sibling folder."""
    seed = spec.distill.get("teacher_seed")
    return out if seed is None or seed == config.seed else out.parent / f"seed_{seed}"


def _model_settings(config, spec, out):
    """The settings that decide the trained model `spec` (its teacher's fingerprint included)."""
    teacher = None
    if spec.distill:
        name = spec.distill["teacher"]
        if name.endswith(".keras"):
            teacher = "sha256:" + fingerprints.file_digest(pathlib.Path(name))
        else:
            folder = _teacher_folder(config, spec, out)
            record = _reusable(folder / "models" / f"{name}.train.json")
            if record is not None and "fingerprint" in record:
                teacher = record["fingerprint"]
            elif folder != out:  # another seed's teacher, trained later in this run
                teacher = f"{name} of seed {spec.distill['teacher_seed']}, not trained yet"
            else:
                teacher_spec = config.model(name)
                if teacher_spec is not None:
                    teacher = fingerprints.fingerprint(_model_settings(config, teacher_spec, out))
    return fingerprints.model_settings(config, spec, versions(), teacher, data.digest(config.dataset))


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


def _check_earlier_work(config, out):
    """Stops before any work when `out` holds trained models or training checkpoints made with other settings.

    Raises:
        ExperimentError: naming each artifact and the settings that changed.
    """
    problems = []
    for spec in config.models:
        settings = _model_settings(config, spec, out)
        expected = fingerprints.fingerprint(settings)
        name = spec.name
        candidates = []
        if (out / "models" / f"{name}.keras").is_file():
            candidates.append((f"models/{name}.keras", out / "models" / f"{name}.train.json"))
        if (out / "checkpoints" / name).is_dir():
            candidates.append((f"checkpoints/{name} (unfinished training)", out / "checkpoints" / name / "settings.json"))
        for label, record_path in candidates:
            record = _reusable(record_path) or {}
            if record.get("fingerprint") != expected:
                changed = fingerprints.changes(record.get("settings"), settings)
                problems.append(f"  {label}: " + "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""))
    if problems:
        raise ExperimentError(
            f"{str(out)!r} holds work done with other settings:\n" + "\n".join(problems) + "\n"
            "Rerun with --fresh to delete it and start these models over, or use another --out. "
            f"Received: out_dir={str(out)!r}")


def _delete_earlier_work(config, out, say):
    """`--fresh`: removes every artifact of the experiment's models from `out` (other models' files stay)."""
    norms = ("linf", "l2")
    for spec in config.models:
        name = spec.name
        stem = spec.file_name
        # The model's own files by their exact names: a glob such as `a.*` would also take model `a.b`'s.
        doomed = [out / "checkpoints" / name, out / "logs" / name,
                  *(out / "models" / f"{name}{suffix}" for suffix in (".keras", ".train.json", ".history.csv")),
                  *(out / "results" / f"{name}__{norm}.json" for norm in norms),
                  *(out / "export" / f"{stem}{suffix}" for suffix in (".tflite", ".int8.tflite", ".h", ".cc",
                                                                      ".parity.json", ".compression.json")),
                  *(out / "export" / f"{name}__{norm}.deployed.json" for norm in norms)]
        doomed = [path for path in doomed if path.exists()]
        for path in doomed:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        if doomed:
            say(f"{name}: earlier work deleted (--fresh)")


def _prepare_folder(config, out, fresh, say):
    """Before any work: `--fresh` deletes the models' earlier work in `out`, otherwise work made with other
    settings stops the run (`_check_earlier_work`)."""
    if fresh:
        _delete_earlier_work(config, out, say)
    else:
        _check_earlier_work(config, out)


class _Say:
    def __init__(self, verbose):
        self.verbose = verbose

    def __call__(self, message):
        if self.verbose:
            print(message, flush=True)


def _build(config, spec, dataset_info, out):
    """The model to `fit`: plain, a `RobustModel`, a `RobustDistiller` around the student, a multi-exit
    model, or a `NEOKD` trainer around one (any adversarially trained multi-exit model; alpha=beta=0
    without a `neokd` table)."""
    model = models.get(spec.architecture, quantization=spec.quantization, num_classes=dataset_info.num_classes,
                       input_shape=dataset_info.input_shape, **spec.options)
    jacobian = None
    if spec.jacobian:
        layers, fraction = jacobian_settings(spec.jacobian)
        jacobian = JacobianRegularizer(layers=dict(layers), batch_fraction=fraction)
    adversary = None
    if spec.adversary:
        adversary = AdversarialTraining(input_range=dataset_info.input_range, seed=config.seed, **spec.adversary)
    if spec.exits:
        network = multiexit.attach_exits(model, spec.exits["layers"], name=spec.name,
                                         head=spec.exits.get("head", "dense"))
        if adversary is None:
            return network
        neokd = spec.neokd or {"alpha": 0.0, "beta": 0.0}
        return multiexit.NEOKD(network, adversary=adversary, seed=config.seed, name=f"neokd_{spec.name}",
                               **neokd)
    teaching = spec.distill
    if teaching is not None:
        student = model if jacobian is None else RobustModel.wrap(model, jacobian=jacobian, name=spec.name)
        teacher = teaching["teacher"]
        path = (pathlib.Path(teacher) if teacher.endswith(".keras")
                else _teacher_folder(config, spec, out) / "models" / f"{teacher}.keras")
        if not path.is_file():
            raise FileNotFoundError(f"The teacher of {spec.name!r} is not trained: no {path}. Run its stage first "
                                    f"(`--models {teacher}`) or copy its .keras file there. Received: "
                                    f"distill.teacher={teacher!r}")
        method = teaching.get("method", "ard")
        if method != "kd" and adversary is None:  # the dataset's threat scale: 8/255 of its input range
            low, high = dataset_info.input_range
            adversary = AdversarialTraining("pgd", epsilon=8 / 255 * (high - low), steps=10,
                                            input_range=dataset_info.input_range, seed=config.seed)
        return distill.RobustDistiller(student, keras.saving.load_model(path), method=method,
                                       temperature=teaching.get("temperature"), alpha=teaching.get("alpha"),
                                       attack_training=teaching.get("attack_training"), adversary=adversary,
                                       name=f"distill_{spec.name}")
    if jacobian is None and adversary is None:
        return model
    return RobustModel.wrap(model, jacobian=jacobian, adversary=adversary, name=spec.name)


def _recipe_callbacks(recipe, model):
    """The schedulers `[train]` asks for, each only where the model has what it schedules.

    Args:
        recipe: the experiment's `TrainSpec`.
        model: the model about to be fitted.

    Returns:
        A list of callbacks (empty for a recipe without schedule or ramps).
    """
    found = []
    if recipe.epochs == 0:
        return found
    if recipe.schedule is not None or recipe.warmup_epochs:
        found.append(callbacks.CosineLearningRate(recipe.learning_rate, recipe.epochs,
                                                  warmup_epochs=recipe.warmup_epochs or 0,
                                                  final_fraction=0.0 if recipe.schedule == "cosine" else 1.0))
    robust = isinstance(model, RobustModel)
    if recipe.jacobian_ramp_epochs and robust and model.jacobian is not None:
        found.append(callbacks.JacobianWeightScheduler(recipe.jacobian_ramp_epochs))
    if recipe.epsilon_ramp_epochs and robust and model.adversary is not None:
        found.append(callbacks.EpsilonScheduler(recipe.epsilon_ramp_epochs))
    if recipe.noise_anneal_epochs and quantizers.stochastic_quantizers(model):
        found.append(callbacks.QuantizationNoiseScheduler(recipe.noise_anneal_epochs,
                                                          start_epoch=recipe.noise_anneal_window()[0]))
    return found


def _early_stopping(config, spec, model, path):
    """The model's `callbacks.RobustEarlyStopping` (PGD at its training epsilon on the first `examples` of the
    validation split), kept in `path`; None without an `early_stopping` table."""
    if not spec.early_stopping:
        return None
    settings, recipe = spec.early_stopping, config.train
    x, y = data.load_arrays(config.dataset, "validation", validation_fraction=recipe.validation_fraction,
                            limit=settings["examples"], seed=config.seed)
    epsilon = model.adversary.epsilon
    input_range = data.info(config.dataset).input_range
    if spec.exits:  # the claim is about the weakest exit: select on it, under the attack on every exit
        attack = multiexit.MultiExitPGD(epsilon, target="average", steps=settings["steps"], rel_step_size=0.25,
                                        input_range=input_range, seed=config.seed)
    else:
        attack = attacks.PGD(epsilon, steps=settings["steps"], rel_step_size=0.25, input_range=input_range,
                             seed=config.seed)
    window = recipe.noise_anneal_window() if quantizers.stochastic_quantizers(model) else None
    return callbacks.RobustEarlyStopping(x, y, epsilon=epsilon, attack=attack, collapse=settings["collapse"],
                                         path=path, name="held_out_pgd", exit="weakest" if spec.exits else "final",
                                         keep_from_epoch=0 if window is None else window[1])


class _TrainingClock(keras.callbacks.Callback):
    """Adds up the seconds of finished epochs across interrupted and resumed runs.

    After every epoch the running total goes to `path` (beside the
    `BackupAndRestore` checkpoint), and a resumed run starts from it; an epoch
    cut short by an interruption is not counted (it is trained again).

    Args:
        path: the JSON file that holds the total.
    """

    def __init__(self, path):
        super().__init__()
        self.path = pathlib.Path(path)
        self.earlier = 0.0
        self.resumed = False
        self.start = None

    def on_train_begin(self, logs=None):
        record = _reusable(self.path)
        self.earlier = float(record["seconds"]) if record else 0.0
        self.resumed = record is not None
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        files.write_json(self.path, {"seconds": self.seconds, "epoch": epoch}, indent=None)

    @property
    def seconds(self):
        """Training seconds so far, earlier runs included."""
        return self.earlier + (time.perf_counter() - self.start if self.start is not None else 0.0)


def train(config, spec, out, verbose=True):
    """Trains one model, or loads it when `out/models/<name>.keras` exists.

    Interrupted training resumes from the last finished epoch
    (`keras.callbacks.BackupAndRestore` in `out/checkpoints/<name>`); every
    epoch's randomness depends only on the seed and its number
    (`callbacks.SeedEachEpoch`), so the resumed run ends bit for bit like an
    uninterrupted one.

    Returns:
        (model, seconds spent training it, earlier interrupted runs included;
        0.0 when it was loaded).
    """
    path = out / "models" / f"{spec.name}.keras"
    settings = _model_settings(config, spec, out)
    record = {"settings": settings, "fingerprint": fingerprints.fingerprint(settings)}
    _drop_foreign_model(path, out / "models" / f"{spec.name}.train.json")
    model = _reusable(path, keras.saving.load_model)
    if model is not None:  # its settings were checked before any work (`_check_earlier_work`), its bytes above
        return model, 0.0
    dataset_info = data.info(config.dataset)
    recipe = config.train
    keras.utils.set_random_seed(config.seed)
    strategy = distribute.strategy(recipe.distribute)  # batch_size is the global batch
    with strategy.scope():
        model = _build(config, spec, dataset_info, out)
        exits = len(model.outputs) if spec.exits and not isinstance(model, multiexit.NEOKD) else 0
        if isinstance(model, (distill.RobustDistiller, multiexit.NEOKD)):  # the loss comes from the method
            model.compile(optimizer=keras.optimizers.Adam(recipe.learning_rate))
        elif exits:  # a plain multi-exit model: cross-entropy averaged over the exits
            model.compile(optimizer=keras.optimizers.Adam(recipe.learning_rate),
                          loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True)] * exits,
                          loss_weights=[1 / exits] * exits, metrics=[["accuracy"]] * exits)
        else:  # clean accuracy in the history where the step has a clean pass (plain training, JR, TRADES)
            clean = not isinstance(model, RobustModel) or model.objective.passes(model, model.adversarial)[0]
            model.compile(optimizer=keras.optimizers.Adam(recipe.learning_rate),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"] if clean else None)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    train_data = data.load(config.dataset, "train", batch_size=recipe.batch_size, seed=config.seed,
                           limit=recipe.limit, augment=recipe.augment,
                           validation_fraction=recipe.validation_fraction, epoch=epoch)
    if exits:  # one copy of the labels per exit
        train_data = train_data.map(lambda x, y: (x, (y,) * exits))
    checkpoints = out / "checkpoints" / spec.name
    checkpoints.mkdir(parents=True, exist_ok=True)
    files.write_json(checkpoints / "settings.json", record, default=str)
    _drop_unreadable_checkpoint(checkpoints, spec.name)
    # Two checkpoints: Keras falls back to the previous one when a write was cut short (a kill, a full disk).
    backup = keras.callbacks.BackupAndRestore(str(checkpoints), double_checkpoint=True)
    clock = _TrainingClock(checkpoints / "clock.json")
    guard = _early_stopping(config, spec, model, checkpoints / "early_stopping")
    # The per-epoch history beside the model (a CSV the report plots, and TensorBoard logs), written before the
    # epoch is backed up: an epoch trained again after an interruption is written again, and the last one counts.
    (out / "models").mkdir(parents=True, exist_ok=True)
    history = [keras.callbacks.CSVLogger(str(out / "models" / f"{spec.name}.history.csv"), append=True),
               keras.callbacks.TensorBoard(log_dir=str(out / "logs" / spec.name), write_graph=False)]
    steps = [*([guard] if guard else []), *history, backup, clock, callbacks.SeedEachEpoch(config.seed, epoch),
             callbacks.StopOnNonFiniteLoss(), *_recipe_callbacks(recipe, model)]
    distribute.fit(model, train_data, epochs=recipe.epochs, callbacks=steps,
                   verbose=1 if verbose and sys.stdout.isatty() else 2 if verbose else 0)
    seconds = clock.seconds
    if isinstance(model, distill.RobustDistiller):  # what is evaluated and deployed is the student
        model = model.student
    if isinstance(model, multiexit.NEOKD):
        model = model.network
    # The record first, with the digest of the file it describes: a model file is never without the settings
    # that made it, and a file put in its place is recognised.
    stopped = {"early_stopping": guard.record()} if guard else {}
    with files.atomic_path(path) as partial:
        model.save(partial)
        files.write_json(out / "models" / f"{spec.name}.train.json",
                         {"seconds": seconds, "resumed": clock.resumed, **stopped, **record,
                          "model_sha256": fingerprints.file_digest(partial)}, default=str)
    return model, seconds


def _drop_foreign_model(path, record_path):
    """Deletes (with a warning) a trained model file whose bytes are not the ones its record describes, e.g.
    another model's `.keras` copied over it: it is trained again rather than evaluated under this name."""
    record = _reusable(record_path)
    expected = (record or {}).get("model_sha256")  # absent in records from before the digest
    if expected is None or not path.is_file() or fingerprints.file_digest(path) == expected:
        return
    warnings.warn(f"{path} is not the file its record ({record_path.name}) describes (replaced or changed?); "
                  "it is trained again.", stacklevel=3)
    path.unlink()


def _readable_weights(path):
    """True when `path` is an HDF5 file that opens (a checkpoint cut short by a kill or a full disk does not)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return len(handle.keys()) > 0
    except (OSError, ValueError):
        return False


def _drop_unreadable_checkpoint(folder, name):
    """Deletes a training checkpoint neither of whose two copies can be read, with a warning: the model then
    trains from its first epoch (its held-out selection and clock start over with it) instead of failing every
    rerun with a traceback."""
    latest, previous = folder / "latest.weights.h5", folder / "latest.weights.h5.bkp"
    if not latest.exists() or _readable_weights(latest) or (previous.exists() and _readable_weights(previous)):
        return
    warnings.warn(f"The training checkpoint of {name!r} ({latest}) is corrupt (cut short by a kill or a full disk?); "
                  f"{name!r} trains again from its first epoch", stacklevel=3)
    for path in folder.iterdir():
        if path.name != "settings.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _deployed(config, spec, model, attacked, cascade, out, x, y, threat, say, model_fingerprint, fingerprint,
              timings=None):
    """Exports the model (compressed when `[export] compress`) and evaluates the shipped TFLite Micro artifact
    (clean, transfer, Square, HopSkipJump); `attacked` is the model's attack view (`fold_quantized_weights`),
    `cascade` the threat model's suite or None; the export and the record are reused only when their
    fingerprints match `model_fingerprint` (the export's) and `fingerprint` (the result's)."""
    settings = config.export
    record_path = out / "export" / f"{spec.name}__{threat.norm}.deployed.json"
    record = _reusable(record_path)
    if record is not None and record.get("fingerprint") == fingerprint:
        return record
    name = spec.file_name
    parity_path = out / "export" / f"{name}.parity.json"
    parity = _reusable(parity_path)
    export_settings = fingerprints.export_settings(config, model_fingerprint, versions())
    shipped = out / "export" / f"{name}.tflite"
    foreign = (parity is not None and parity.get("tflite_sha256") is not None
               and (not shipped.is_file() or fingerprints.file_digest(shipped) != parity["tflite_sha256"]))
    if foreign:  # another file in its place, or one cut short: exported again, never evaluated as this model
        warnings.warn(f"{shipped} is not the file its parity record describes; it is exported again.", stacklevel=2)
    if foreign or parity is None or parity.get("fingerprint") != fingerprints.fingerprint(export_settings):
        calibration, indices = data.calibration_set(config.dataset, size=settings.calibration_size,
                                                    seed=config.seed)
        x_parity, y_parity = data.load_arrays(config.dataset, "test", limit=settings.parity_examples)
        provenance = {"calibration_split": "train", "calibration_indices": [int(i) for i in indices],
                      "settings": export_settings, "fingerprint": fingerprints.fingerprint(export_settings)}
        start = time.perf_counter()
        export.export_and_verify(model, out / "export", name, calibration, (x_parity, y_parity), runtimes=("tflm",),
                                 record=provenance, verbose=say.verbose, compress=settings.compress,
                                 input_range=data.info(config.dataset).input_range,
                                 arena_limit=settings.arena_limit)
        if timings is not None:
            timings["export"] = time.perf_counter() - start
    parity = json.loads(parity_path.read_text())
    deployed = export.TFLiteModel(out / "export" / f"{name}.tflite")
    n = settings.deployed_examples  # at most the threat model's examples (`_check_sizes`)
    x_d, y_d = x[:n], y[:n]

    epsilons = list(threat.deployed_epsilons or threat.epsilons)
    input_range = data.info(config.dataset).input_range
    clean = deployed(x_d).argmax(-1) == y_d
    correct = {}  # attack -> per eps: correct on clean input and under the attack, per example

    def record_attack(key, result):
        correct[key] = [clean & (deployed(xa).argmax(-1) == y_d) for xa in result.x_adv]

    if "transfer" in settings.deployed_attacks:
        source, label = _transfer_source(cascade, threat, epsilons, input_range, config.seed)
        say(f"  {spec.name}: transfer {label} from the Keras model to TFLite Micro ({n} examples)")
        record_attack("transfer", source.run(attacked, x_d, y_d))
    queries = settings.deployed_queries
    black_box = {"square": attacks.Square, "hopskipjump": attacks.HopSkipJump}
    for key in [key for key in settings.deployed_attacks if key in black_box]:
        attack = black_box[key](epsilons, norm=threat.norm, queries=queries, input_range=input_range,
                                seed=config.seed)
        say(f"  {spec.name}: {type(attack).__name__} ({queries} queries) on TFLite Micro ({n} examples)")
        record_attack(key, attack.run(deployed, x_d, y_d))
    worst, robust, worst_correct = {}, clean, {}
    for i, eps in enumerate(epsilons):  # per example over every deployed attack, never rising with eps
        for per_eps in correct.values():
            robust = robust & per_eps[i]
        worst[str(eps)] = float(np.mean(robust))
        worst_correct[eps] = robust
    scale = deployed.input_scale[0] if deployed.input_scale else None
    steps = {str(e): (None if scale is None else float(e / scale)) for e in epsilons}
    checks = attacks.check_model(deployed, x_d, y_d, gradients=False, warn=False).flags
    below = [e for e, v in steps.items() if v is not None and 0 < v < 1 and threat.norm == "linf"]
    if below:
        checks["eps_below_input_step"] = (
            f"eps {', '.join(below)} is below one int8 input step ({scale:.4g}) of the deployed model: most of such a "
            f"perturbation vanishes in the device's input quantization.")
    compression = parity.get("compression")
    # Host interpreter time per inference, and the int8 file's: their ratio is the DECODE overhead (not an MCU's time).
    timed = {"seconds_per_inference": deployed.seconds_per_inference(x_d, runs=_TIMED_RUNS)}
    if compression and compression["compressed"]:
        int8_file = export.TFLiteModel(export.uncompressed_path(out / "export" / f"{name}.tflite"))
        timed["int8_seconds_per_inference"] = int8_file.seconds_per_inference(x_d, runs=_TIMED_RUNS)
        timed["channel_groups"] = compression.get("groups") or {}
    record = {**timed, "model_bytes": parity["model_bytes"], "arena_bytes": parity["arena_bytes"], "compress": settings.compress,
              "compressed": bool(compression and compression["compressed"]),
              "int8_model_bytes": compression["int8_bytes"] if compression else parity["model_bytes"],
              "int8_arena_bytes": compression["int8_arena_bytes"] if compression else parity["arena_bytes"],
              "examples": int(n), "keras_accuracy": float(np.mean(labels_of(predict(attacked, x_d)) == y_d)),
              "clean_accuracy": float(np.mean(clean)),
              "robust_accuracy": {k: {str(e): float(np.mean(v[i])) for i, e in enumerate(epsilons)}
                                  for k, v in correct.items()},
              "worst_case": worst, "input_scale": scale, "eps_in_input_steps": steps, "checks": checks,
              "parity_examples": parity["examples"], "agreement": parity["agreement"]["tflm"],
              "max_logit_difference": parity["max_logit_difference"]["tflm"],
              "parity_keras_accuracy": parity["accuracy"]["keras"], "parity_clean_accuracy": parity["accuracy"]["tflm"],
              "calibration_indices_sha": _digest(parity["calibration_indices"]), "fingerprint": fingerprint,
              "per_example": per_example.record(clean, worst_correct)}
    files.write_json(record_path, record)
    return record


_TIMED_RUNS = 100  # timed TFLite Micro invocations per file in the deployed record


def _transfer_source(cascade, threat, epsilons, input_range, seed):
    """The white-box attack whose adversarials on the Keras model are replayed on the deployed one, and its label.

    The gradient stages (APGD-CE, then APGD-T) of the threat model's suite
    `cascade` (their compiled functions are reused), else PGD-20; at the radii `epsilons`.
    """
    if cascade is None:
        return attacks.PGD(epsilons, norm=threat.norm, steps=20, input_range=input_range, seed=seed), "PGD-20"
    white = {name: attack for name, attack in cascade.stages.items() if not attack.black_box}
    return attacks.Cascade(white, eps=epsilons), " + ".join(name.upper() for name in white)


def _multi_exit(network, x, y, threat, thresholds, input_range, seed):
    """Every exit's accuracy, clean and under the multi-exit PGD attacks, and early-exit inference.

    Returns:
        The result's `multi_exit` record (see `tinyrobust.bench.results`).
    """
    settings = threat.multi_exit

    def early(inputs):
        return {str(t): _early_exit_record(multiexit.early_exit(network, inputs, threshold=t), y) for t in thresholds}

    record = {"exit_macs": multiexit.exit_macs(network), "clean": multiexit.exit_accuracies(network, x, y),
              "attacks": {}, "early_exit": {"clean": early(x)}}
    for target in settings["targets"]:
        attack = multiexit.MultiExitPGD(list(threat.epsilons), target=target, norm=threat.norm,
                                        steps=settings["steps"], input_range=input_range, seed=seed)
        result = attack.run(network, x, y)
        record["attacks"][target] = {str(e): multiexit.exit_accuracies(network, xa, y)
                                     for e, xa in zip(result.epsilons, result.x_adv)}
        record["early_exit"][target] = {str(e): early(xa) for e, xa in zip(result.epsilons, result.x_adv)}
    return record


def _early_exit_record(result, y):
    return {"accuracy": float(np.mean(result.predictions == y)), "relative_compute": result.relative_compute,
            "average_macs": result.average_macs}


def _digest(indices):
    return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]


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
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"The output folder is a file. Received: out_dir={str(out)!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"Cannot create the output folder ({error.strerror}). Received: out_dir={str(out)!r}") from None
    with files.folder_lock(out):
        seeds = list(config.seeds)
        _check_sizes(config)
        folders = {seed: out if len(seeds) == 1 else out / f"seed_{seed}" for seed in seeds}
        for seed, folder in folders.items():  # before any work
            _prepare_folder(config.with_seed(seed), folder, fresh, say)
        files.write_json(out / "experiment.json", config.to_dict())
        all_results = []
        for seed in seeds:
            if len(seeds) == 1:
                all_results += _run_seed(config, out, command, say)
            else:
                say(f"seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})")
                all_results += _run_seed(config.with_seed(seed), out / f"seed_{seed}", command,
                                         say)
        write_report(_with_earlier_results(all_results, out, config, seeds), out)
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
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = {}
    with files.folder_lock(out):
        _prepare_folder(config, out, fresh, say)
        for spec in config.models:
            say(f"{spec.name}: training {spec.architecture} ({spec.quantization}) on {config.dataset}")
            trained[spec.name] = train(config, spec, out, verbose)
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
    result = _reusable(path)
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


def _test_accuracy(model, x, y):
    """`(record, correct)`: the `test_accuracy` record (`model`'s clean accuracy on the whole test split
    `(x, y)`) and the per-example correctness behind it."""
    correct = labels_of(predict(model, x)) == y
    return {"accuracy": float(np.mean(correct)), "examples": int(len(y))}, correct


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


def _run_seed(config, out, command, say):
    """Trains, attacks and exports every model with one seed; returns the result dicts."""
    verbose = say.verbose
    out.mkdir(parents=True, exist_ok=True)
    dataset_info = data.info(config.dataset)
    examples = max(t.examples for t in config.threat_models.values())
    x_split, y_split = data.load_arrays(config.dataset, "test")  # the whole split, for `test_accuracy`
    x_test, y_test = x_split[:examples], y_split[:examples]  # the attacked examples
    all_results = []
    for spec in config.models:
        model_settings = _model_settings(config, spec, out)
        model_fingerprint = fingerprints.fingerprint(model_settings)
        settings = {n: fingerprints.result_settings(config, n, model_fingerprint, versions())
                    for n in config.threat_models}
        existing = {n: _reused_result(out / "results" / f"{spec.name}__{n}.json", settings[n], say)
                    for n in config.threat_models}
        # Results from before `test_accuracy` gain it from the saved model; without that file they stay as they are.
        backfill = [n for n, r in existing.items() if r is not None and r.get("test_accuracy") is None]
        if not (out / "models" / f"{spec.name}.keras").is_file():
            backfill = []
        if all(r is not None for r in existing.values()) and not backfill:
            say(f"{spec.name}: results exist with these settings, skipped")
            all_results += list(existing.values())
            continue
        say(f"{spec.name}: training {spec.architecture} ({spec.quantization}) on {config.dataset}")
        model, _ = train(config, spec, out, verbose)
        train_record = _reusable(out / "models" / f"{spec.name}.train.json")
        train_seconds = train_record.get("seconds") if train_record else None
        network = None
        if spec.exits:  # attacks, checks and export see the final exit; `multi_exit` covers every exit
            network, model = model, multiexit.final_exit(model, name=f"{spec.name}_final")
        footprint, bits = _footprint(network or model)
        attacked = export.fold_quantized_weights(model)  # the same outputs, weight quantizers evaluated once
        test_accuracy, test_correct = _test_accuracy(attacked, x_split, y_split)
        for norm, threat in config.threat_models.items():
            path = out / "results" / f"{spec.name}__{norm}.json"
            if existing[norm] is not None:
                if norm in backfill:
                    say(f"  {spec.name}: {path.name} gains its accuracy on the whole test split "
                        f"({100 * test_accuracy['accuracy']:.2f}%); its attacks are not redone")
                    existing[norm] = _with_test_accuracy(existing[norm], test_accuracy, path)
                all_results.append(existing[norm])
                continue
            n = threat.examples
            x, y = x_test[:n], y_test[:n]
            suite = {name: build_attack(s, norm, threat.epsilons, dataset_info.input_range, config.seed)
                     for name, s in threat.attacks.items()}
            cascade = build_suite(threat.suite, norm, threat.epsilons, dataset_info.input_range,
                                  dataset_info.num_classes, config.seed)
            if cascade is not None:
                suite[threat.suite["name"]] = cascade
            say(f"  {spec.name}: attacks {', '.join(suite)} at eps {threat.epsilons} ({norm}, {n} examples)")
            start = time.perf_counter()
            report = attacks.robust_accuracy(attacked, (x, y), suite, verbose=verbose)
            checks = attacks.check_model(model, x[:256], y[:256], report=report, warn=False)
            evaluate_seconds = time.perf_counter() - start
            deployed, export_seconds, deployed_seconds = None, None, None
            if config.export.enabled:
                start, timings = time.perf_counter(), {}
                deployed = _deployed(config, spec, model, attacked, cascade, out, x, y, threat, say, model_fingerprint,
                                     fingerprints.fingerprint(settings[norm]), timings)
                export_seconds = timings.get("export", 0.0)  # 0: the exported files were reused
                deployed_seconds = time.perf_counter() - start - export_seconds
            multi_exit = None
            if network is not None:
                say(f"  {spec.name}: every exit under {', '.join(threat.multi_exit['targets'])} PGD-"
                    f"{threat.multi_exit['steps']}, early exit at thresholds {spec.exits['thresholds']}")
                multi_exit = _multi_exit(network, x, y, threat, spec.exits["thresholds"],
                                         dataset_info.input_range, config.seed)
            accuracy = report.accuracy()
            target = QUALITY_TARGETS.get((config.dataset, spec.architecture))
            entry = spec.to_dict()
            result = {
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
                "threat_model": {"norm": norm, "epsilons": list(threat.epsilons), "examples": int(len(x))},
                "clean_accuracy": accuracy["clean"], "test_accuracy": test_accuracy,
                "robust_accuracy": accuracy["attacks"],
                "worst_case": accuracy["worst"],
                "queries": {a: {str(e): float(q) for e, q in per.items()} for a, per in report.queries.items()},
                "attack_kinds": report.kinds, "checks": checks.flags,
                "quality_target": _quality_target(target, test_accuracy),
                "deployed": deployed, "multi_exit": multi_exit,
                "early_stopping": (train_record or {}).get("early_stopping"),
                "wall_time_s": {"train": train_seconds, "evaluate": evaluate_seconds, "export": export_seconds,
                                "deployed": deployed_seconds},
                "settings": {**settings[norm], "model_settings": model_settings},
                "fingerprint": fingerprints.fingerprint(settings[norm]),
                "per_example": {**per_example.record(report.clean, report.worst),
                                "test_split": per_example.pack(test_correct)},
            }
            results_lib.write(result, path)
            all_results.append(result)
        keras.backend.clear_session()
    return all_results


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
