"""The bench's stages: train -> export -> evaluate (per threat model) -> deployed -> multi-exit.

Each stage takes its own spec and the artifacts of the stages before it and
returns its record; none reads the whole experiment (`runner.run` is the loop
that calls them). Every stage that writes an artifact reuses it when its
fingerprint matches (`tinyrobust.bench.fingerprints`), so an interrupted run
resumes where it stopped.
"""

import dataclasses
import hashlib
import sys
import time
import warnings
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf

from tinyrobust import attacks, callbacks, data, distill, distribute, export, files, models, multiexit, quantizers
from tinyrobust.attacks.base import labels_of, predict
from tinyrobust.bench import fingerprints, per_example
from tinyrobust.bench.config import build_attack, build_suite
from tinyrobust.bench.run_folder import read_reusable
from tinyrobust.export.interpreter import paired_seconds_per_inference
from tinyrobust.training import AdversarialTraining, RobustModel, compile_for_training

__all__ = ["TrainedModel", "Exported", "Evaluation", "build_model", "train_model", "export_model", "evaluate",
           "evaluate_deployed", "evaluate_exits", "recipe_callbacks", "test_accuracy"]

_TIMED_RUNS = 100  # timed TFLite Micro invocations per file in the deployed record


@dataclasses.dataclass
class TrainedModel:
    """What the train stage hands on.

    Attributes:
        model: the trained network (a distiller's student, a NEO-KD trainer's multi-exit network).
        seconds: training seconds, earlier interrupted runs included (None for records without them).
        early_stopping: `callbacks.RobustEarlyStopping.record()` of the run, or None.
    """

    model: Any
    seconds: Optional[float]
    early_stopping: Optional[dict] = None


@dataclasses.dataclass
class Exported:
    """The exported files of one model and their parity record.

    Attributes:
        shipped: path of the shipped `.tflite`.
        parity: the parity record (`export.ParityReport` fields, provenance, the compression report).
        seconds: export seconds (0.0 when the files were reused).
    """

    shipped: Any
    parity: dict
    seconds: float


@dataclasses.dataclass
class Evaluation:
    """One threat model's white- and black-box evaluation of the Keras model.

    Attributes:
        report: the `attacks.RobustnessReport`.
        checks: `attacks.check_model`'s result.
        cascade: the threat model's suite (`attacks.Cascade`), or None.
        seconds: wall seconds.
        examples: the number of attacked examples.
    """

    report: Any
    checks: Any
    cascade: Any
    seconds: float
    examples: int


def _say(verbose, message):
    if verbose:
        print(message, flush=True)


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
        self.path = path
        self.earlier = 0.0
        self.resumed = False
        self.start = None

    def on_train_begin(self, logs=None):
        record = read_reusable(self.path)
        self.earlier = float(record["seconds"]) if record else 0.0
        self.resumed = record is not None
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        files.write_json(self.path, {"seconds": self.seconds, "epoch": epoch}, indent=None)

    @property
    def seconds(self):
        """Training seconds so far, earlier runs included."""
        return self.earlier + (time.perf_counter() - self.start if self.start is not None else 0.0)


def build_model(spec, dataset_info, seed, teacher_path=None):
    """The model to `fit` for the model spec `spec`: plain, a `RobustModel`, a `RobustDistiller` around the
    student, a multi-exit model, or a `NEOKD` trainer around one (any adversarially trained multi-exit
    model; alpha=beta=0 without a `neokd` table).

    Args:
        spec: the `ModelSpec`.
        dataset_info: `data.info` of the data set (input shape, classes, input range).
        seed: the run's seed (adversaries and NEO-KD draw from it).
        teacher_path: the teacher's `.keras` file of a student (`RunFolder.teacher`).

    Raises:
        FileNotFoundError: a student whose teacher is not trained.
    """
    model = models.get(spec.architecture, quantization=spec.quantization, num_classes=dataset_info.num_classes,
                       input_shape=dataset_info.input_shape, **spec.options)
    jacobian = spec.jacobian_regularizer()
    adversary = spec.adversarial_training(dataset_info.input_range, seed)
    if spec.exits:
        network = multiexit.attach_exits(model, spec.exits["layers"], name=spec.name,
                                         head=spec.exits.get("head", "dense"))
        if adversary is None:
            return network
        neokd = spec.neokd or {"alpha": 0.0, "beta": 0.0}
        return multiexit.NEOKD(network, adversary=adversary, seed=seed, name=f"neokd_{spec.name}", **neokd)
    teaching = spec.distill
    if teaching is not None:
        student = model if jacobian is None else RobustModel.wrap(model, jacobian=jacobian, name=spec.name)
        if teacher_path is None or not teacher_path.is_file():
            raise FileNotFoundError(
                f"The teacher of {spec.name!r} is not trained: no {teacher_path}. Run its stage first "
                f"(`--models {teaching['teacher']}`) or copy its .keras file there. Received: "
                f"distill.teacher={teaching['teacher']!r}")
        method = teaching.get("method", "ard")
        if method != "kd" and adversary is None:  # the dataset's threat scale: 8/255 of its input range
            low, high = dataset_info.input_range
            adversary = AdversarialTraining("pgd", epsilon=8 / 255 * (high - low), steps=10,
                                            input_range=dataset_info.input_range, seed=seed)
        return distill.RobustDistiller(student, keras.saving.load_model(teacher_path), method=method,
                                       temperature=teaching.get("temperature"), alpha=teaching.get("alpha"),
                                       attack_training=teaching.get("attack_training"), adversary=adversary,
                                       name=f"distill_{spec.name}")
    if jacobian is None and adversary is None:
        return model
    return RobustModel.wrap(model, jacobian=jacobian, adversary=adversary, name=spec.name)


def recipe_callbacks(recipe, model):
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
    jacobian = getattr(model, "jacobian", None)
    adversary = getattr(model, "adversary", None)
    if recipe.jacobian_ramp_epochs and jacobian is not None:
        found.append(callbacks.JacobianWeightScheduler(recipe.jacobian_ramp_epochs))
    if recipe.epsilon_ramp_epochs and adversary is not None:
        found.append(callbacks.EpsilonScheduler(recipe.epsilon_ramp_epochs))
    if recipe.noise_anneal_epochs and quantizers.stochastic_quantizers(model):
        found.append(callbacks.QuantizationNoiseScheduler(recipe.noise_anneal_epochs,
                                                          start_epoch=recipe.noise_anneal_window()[0]))
    return found


def _early_stopping(spec, recipe, dataset, seed, model, path):
    """The model's `callbacks.RobustEarlyStopping` (PGD at its training epsilon on the first `examples` of the
    validation split), kept in `path`; None without an `early_stopping` table."""
    if not spec.early_stopping:
        return None
    settings = spec.early_stopping
    x, y = data.load_arrays(dataset, "validation", validation_fraction=recipe.validation_fraction,
                            limit=settings["examples"], seed=seed)
    epsilon = model.adversary.epsilon
    input_range = data.info(dataset).input_range
    if spec.exits:  # the claim is about the weakest exit: select on it, under the attack on every exit
        attack = multiexit.MultiExitPGD(epsilon, target="average", steps=settings["steps"], rel_step_size=0.25,
                                        input_range=input_range, seed=seed)
    else:
        attack = attacks.PGD(epsilon, steps=settings["steps"], rel_step_size=0.25, input_range=input_range, seed=seed)
    window = recipe.noise_anneal_window() if quantizers.stochastic_quantizers(model) else None
    return callbacks.RobustEarlyStopping(x, y, epsilon=epsilon, attack=attack, collapse=settings["collapse"],
                                         path=path, name="held_out_pgd", exit="weakest" if spec.exits else "final",
                                         keep_from_epoch=0 if window is None else window[1])


def train_model(spec, recipe, dataset, seed, folder, settings, verbose=True):
    """Trains one model, or loads it when its `.keras` file exists (checked against its record).

    Interrupted training resumes from the last finished epoch
    (`keras.callbacks.BackupAndRestore` in the folder's checkpoints); every
    epoch's randomness depends only on the seed and its number
    (`callbacks.SeedEachEpoch`), so the resumed run ends bit for bit like an
    uninterrupted one.

    Args:
        spec: the `ModelSpec`.
        recipe: the `TrainSpec`.
        dataset: the data set's name.
        seed: the run's seed.
        folder: the `RunFolder`.
        settings: the settings that decide the model (`fingerprints.model_settings`).
        verbose: print Keras' progress.

    Returns:
        A `TrainedModel` (seconds 0.0 for a loaded model: see its train record for the training's).
    """
    path = folder.model(spec.name)
    record = {"settings": settings, "fingerprint": fingerprints.fingerprint(settings)}
    folder.drop_foreign_model(spec.name)
    model = folder.reusable(path, keras.saving.load_model)
    if model is not None:  # its settings were checked before any work (`RunFolder.check_earlier_work`)
        return TrainedModel(model, 0.0)
    dataset_info = data.info(dataset)
    keras.utils.set_random_seed(seed)
    strategy = distribute.strategy(recipe.distribute)  # batch_size is the global batch
    teacher = folder.teacher(spec, seed) if spec.distill else None
    with strategy.scope():
        model = build_model(spec, dataset_info, seed, teacher)
        compile_for_training(model, keras.optimizers.Adam(recipe.learning_rate))
    exits = len(model.outputs) if spec.exits and not hasattr(model, "deployable") else 0  # a plain multi-exit model
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    train_data = data.load(dataset, "train", batch_size=recipe.batch_size, seed=seed, limit=recipe.limit,
                           augment=recipe.augment, validation_fraction=recipe.validation_fraction, epoch=epoch)
    if exits:  # a plain multi-exit model: one copy of the labels per exit
        train_data = train_data.map(lambda x, y: (x, (y,) * exits))
    checkpoints = folder.checkpoints(spec.name)
    checkpoints.mkdir(parents=True, exist_ok=True)
    files.write_json(checkpoints / "settings.json", record, default=str)
    folder.drop_unreadable_checkpoint(spec.name)
    # Two checkpoints: Keras falls back to the previous one when a write was cut short (a kill, a full disk).
    backup = keras.callbacks.BackupAndRestore(str(checkpoints), double_checkpoint=True)
    clock = _TrainingClock(checkpoints / "clock.json")
    guard = _early_stopping(spec, recipe, dataset, seed, model, checkpoints / "early_stopping")
    # The per-epoch history beside the model (a CSV the report plots, and TensorBoard logs), written before the
    # epoch is backed up: an epoch trained again after an interruption is written again, and the last one counts.
    path.parent.mkdir(parents=True, exist_ok=True)
    history = [keras.callbacks.CSVLogger(str(folder.history(spec.name)), append=True),
               keras.callbacks.TensorBoard(log_dir=str(folder.logs(spec.name)), write_graph=False)]
    steps = [*([guard] if guard else []), *history, backup, clock, callbacks.SeedEachEpoch(seed, epoch),
             callbacks.StopOnNonFiniteLoss(), *recipe_callbacks(recipe, model)]
    distribute.fit(model, train_data, epochs=recipe.epochs, callbacks=steps,
                   verbose=1 if verbose and sys.stdout.isatty() else 2 if verbose else 0)
    seconds = clock.seconds
    model = model.deployable() if hasattr(model, "deployable") else model  # the student, the network
    # The record first, with the digest of the file it describes: a model file is never without the settings
    # that made it, and a file put in its place is recognised.
    stopped = {"early_stopping": guard.record()} if guard else {}
    with files.atomic_path(path) as partial:
        model.save(partial)
        files.write_json(folder.train_record(spec.name),
                         {"seconds": seconds, "resumed": clock.resumed, **stopped, **record,
                          "model_sha256": fingerprints.file_digest(partial)}, default=str)
    return TrainedModel(model, seconds, stopped.get("early_stopping"))


def export_model(model, spec, settings, dataset, seed, folder, export_fingerprint_settings, verbose=False):
    """Exports `model` once (compressed when `[export] compress`) and checks its parity with Keras, or reuses
    the files when their parity record has these settings and the shipped file is the one it describes.

    Args:
        model: the Keras model (a multi-exit model's final exit).
        spec: the `ModelSpec` (its `file_name` names the files).
        settings: the `ExportSpec`.
        dataset: the data set's name.
        seed: the run's seed (the calibration draw).
        folder: the `RunFolder`.
        export_fingerprint_settings: `fingerprints.export_settings(...)` of this export.
        verbose: print each export step.

    Returns:
        An `Exported`.
    """
    name = spec.file_name
    parity_path, shipped = folder.parity(name), folder.shipped(name)
    parity = folder.reusable(parity_path)
    fingerprint = fingerprints.fingerprint(export_fingerprint_settings)
    foreign = (parity is not None and parity.get("tflite_sha256") is not None
               and (not shipped.is_file() or fingerprints.file_digest(shipped) != parity["tflite_sha256"]))
    if foreign:  # another file in its place, or one cut short: exported again, never evaluated as this model
        warnings.warn(f"{shipped} is not the file its parity record describes; it is exported again.", stacklevel=2)
    seconds = 0.0
    if foreign or parity is None or parity.get("fingerprint") != fingerprint:
        calibration, indices = data.calibration_set(dataset, size=settings.calibration_size, seed=seed)
        x_parity, y_parity = data.load_arrays(dataset, "test", limit=settings.parity_examples)
        provenance = {"calibration_split": "train", "calibration_indices": [int(i) for i in indices],
                      "settings": export_fingerprint_settings, "fingerprint": fingerprint}
        start = time.perf_counter()
        export.export_and_verify(model, folder.export_folder, name, calibration, (x_parity, y_parity),
                                 runtimes=("tflm",), record=provenance, verbose=verbose,
                                 compress=settings.compress, input_range=data.info(dataset).input_range,
                                 arena_limit=settings.arena_limit)
        seconds = time.perf_counter() - start
        parity = folder.reusable(parity_path)
    return Exported(shipped, parity, seconds)


def evaluate(attacked, model, x, y, threat, dataset_info, seed, label="model", verbose=False):
    """The threat model's attacks and suite on the Keras model, with the honest-evaluation checks.

    Args:
        attacked: the model's attack view (`export.fold_quantized_weights`).
        model: the model the checks look at (its gradients, its stochastic layers).
        x, y: the attacked examples.
        threat: the `ThreatSpec`.
        dataset_info: `data.info` of the data set.
        seed: the attacks' seed.
        label: the model's name, for the progress line.
        verbose: print the progress line and the attacks' progress bars.

    Returns:
        An `Evaluation`.
    """
    norm = threat.norm
    suite = {name: build_attack(s, norm, threat.epsilons, dataset_info.input_range, seed)
             for name, s in threat.attacks.items()}
    cascade = build_suite(threat.suite, norm, threat.epsilons, dataset_info.input_range, dataset_info.num_classes,
                          seed)
    if cascade is not None:
        suite[threat.suite["name"]] = cascade
    _say(verbose, f"  {label}: attacks {', '.join(suite)} at eps {threat.epsilons} ({norm}, {len(x)} examples)")
    start = time.perf_counter()
    report = attacks.robust_accuracy(attacked, (x, y), suite, verbose=verbose)
    checks = attacks.check_model(model, x[:256], y[:256], report=report, warn=False)
    return Evaluation(report, checks, cascade, time.perf_counter() - start, int(len(x)))


def _transfer_source(cascade, threat, epsilons, input_range, seed):
    """The white-box attack whose adversarials on the Keras model are replayed on the deployed one, and its label.

    The gradient stages (APGD-CE, then APGD-T) of the threat model's suite
    `cascade` (their compiled functions are reused), else PGD-20; at the radii `epsilons`.
    """
    if cascade is None:
        return attacks.PGD(epsilons, norm=threat.norm, steps=20, input_range=input_range, seed=seed), "PGD-20"
    white = {name: attack for name, attack in cascade.stages.items() if not attack.black_box}
    return attacks.Cascade(white, eps=epsilons), " + ".join(name.upper() for name in white)


def _digest(indices):
    return hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]


def evaluate_deployed(exported, attacked, cascade, x, y, threat, settings, input_range, seed, label="model",
                      verbose=False):
    """Evaluates the shipped TFLite Micro file: clean, transfer from the Keras model, Square, HopSkipJump.

    Args:
        exported: the export stage's `Exported`.
        attacked: the Keras model's attack view (the transfer source attacks it).
        cascade: the threat model's suite (its gradient stages are the transfer source), or None.
        x, y: the threat model's examples; the first `settings.deployed_examples` are used.
        threat: the `ThreatSpec`.
        settings: the `ExportSpec`.
        input_range: the data set's input range.
        seed: the attacks' seed.
        label: the model's name, for progress lines.
        verbose: print progress lines.

    Returns:
        The result's `deployed` record (without its fingerprint).
    """
    parity = exported.parity
    deployed = export.TFLiteModel(exported.shipped)
    n = settings.deployed_examples  # at most the threat model's examples (checked at load)
    x_d, y_d = x[:n], y[:n]
    epsilons = list(threat.deployed_epsilons or threat.epsilons)
    clean = deployed(x_d).argmax(-1) == y_d
    correct = {}  # attack -> per eps: correct on clean input and under the attack, per example

    def record_attack(key, result):
        correct[key] = [clean & (deployed(xa).argmax(-1) == y_d) for xa in result.x_adv]

    if "transfer" in settings.deployed_attacks:
        source, source_label = _transfer_source(cascade, threat, epsilons, input_range, seed)
        _say(verbose, f"  {label}: transfer {source_label} from the Keras model to TFLite Micro ({n} examples)")
        record_attack("transfer", source.run(attacked, x_d, y_d))
    queries = settings.deployed_queries
    black_box = {"square": attacks.Square, "hopskipjump": attacks.HopSkipJump}
    for key in [key for key in settings.deployed_attacks if key in black_box]:
        attack = black_box[key](epsilons, norm=threat.norm, queries=queries, input_range=input_range, seed=seed)
        _say(verbose, f"  {label}: {type(attack).__name__} ({queries} queries) on TFLite Micro ({n} examples)")
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
    if compression and compression["compressed"]:  # the two files timed in alternating blocks, under one load
        int8_file = export.TFLiteModel(export.uncompressed_path(exported.shipped))
        shipped_seconds, int8_seconds = paired_seconds_per_inference(deployed, int8_file, x_d, runs=_TIMED_RUNS)
        timed = {"seconds_per_inference": shipped_seconds, "int8_seconds_per_inference": int8_seconds,
                 "channel_groups": compression.get("groups") or {}}
    else:
        timed = {"seconds_per_inference": deployed.seconds_per_inference(x_d, runs=_TIMED_RUNS)}
    return {**timed, "model_bytes": parity["model_bytes"], "arena_bytes": parity["arena_bytes"],
            "compress": settings.compress, "compressed": bool(compression and compression["compressed"]),
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
            "calibration_indices_sha": _digest(parity["calibration_indices"]),
            "per_example": per_example.record(clean, worst_correct)}


def _early_exit_record(result, y):
    return {"accuracy": float(np.mean(result.predictions == y)), "relative_compute": result.relative_compute,
            "average_macs": result.average_macs}


def evaluate_exits(network, x, y, threat, thresholds, input_range, seed):
    """Every exit's accuracy, clean and under the multi-exit PGD attacks, and early-exit inference.

    Args:
        network: the multi-exit model.
        x, y: the threat model's examples.
        threat: the `ThreatSpec` (its `multi_exit` table: targets, steps).
        thresholds: the early-exit confidence thresholds.
        input_range: the data set's input range.
        seed: the attacks' seed.

    Returns:
        The result's `multi_exit` record (see `tinyrobust.bench.schema.MultiExit`).
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


def test_accuracy(model, x, y):
    """`(record, correct)`: the `test_accuracy` record (`model`'s clean accuracy on the whole test split
    `(x, y)`) and the per-example correctness behind it."""
    correct = labels_of(predict(model, x)) == y
    return {"accuracy": float(np.mean(correct)), "examples": int(len(y))}, correct


test_accuracy.__test__ = False  # not a pytest test
