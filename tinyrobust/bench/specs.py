"""Typed, frozen specs of an experiment, built once from a validated experiment file.

`tinyrobust.bench.config.load` validates the TOML (building every configured
object: models, quantizers, Jacobian layers, adversaries, attacks, suites,
exits) and returns an `Experiment`. The runner's stages read only these specs;
a spec's canonical form (`to_dict()`) is what its fingerprint hashes
(`tinyrobust.bench.fingerprints`).
"""

import dataclasses
import types
from typing import Any, Mapping, Optional

__all__ = ["TrainSpec", "ModelSpec", "ThreatSpec", "ExportSpec", "Experiment"]


def _frozen(value):
    """Read-only views of nested tables and tuples of lists, so a spec cannot change after it is built."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def jacobian_settings(table):
    """`(layers, batch_fraction)` of a model's `jacobian` table (the weights, or `{layers, batch_fraction}`)."""
    if isinstance(table.get("layers"), Mapping):
        return table["layers"], table.get("batch_fraction", 1.0)
    return table, 1.0


def _plain(value):
    """JSON-ready copy: tables as dicts, sequences as lists, specs as their canonical dicts."""
    if dataclasses.is_dataclass(value):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Spec:
    """Canonical dict of the spec's fields (tables as dicts, sequences as lists)."""

    _omit_when_none = ()

    def to_dict(self):
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.name in self._omit_when_none and getattr(self, f.name) is None)}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _frozen(getattr(self, f.name)))


@dataclasses.dataclass(frozen=True)
class TrainSpec(_Spec):
    """The training recipe shared by every model of the experiment (`[train]`)."""

    epochs: int
    batch_size: int
    learning_rate: float
    limit: Optional[int]
    augment: bool
    validation_fraction: float
    distribute: Optional[str] = None  # "mirrored" | "multi_worker"; batch_size is the global batch
    schedule: Optional[str] = None  # "constant" | "cosine" (per epoch, `callbacks.CosineLearningRate`)
    warmup_epochs: Optional[int] = None  # linear learning-rate warm-up
    jacobian_ramp_epochs: Optional[int] = None  # Jacobian weights rise from 0 over these epochs
    epsilon_ramp_epochs: Optional[int] = None  # adversarial epsilon rises from 0 over these epochs
    noise_anneal_epochs: Optional[int] = None  # STQ/STB noise fades to deterministic over the last epochs
    noise_anneal_start: Optional[int] = None  # 1-based epoch the fade starts (default: it ends with training)

    # Absent keys keep the canonical form (and fingerprint) of runs made before they existed.
    _omit_when_none = ("distribute", "schedule", "warmup_epochs", "jacobian_ramp_epochs", "epsilon_ramp_epochs",
                       "noise_anneal_epochs", "noise_anneal_start")

    def noise_anneal_window(self):
        """`(start, end)`: the 0-based epoch the noise fade starts at and the first epoch trained without
        noise; None without a fade."""
        if not self.noise_anneal_epochs:
            return None
        start = (self.epochs - self.noise_anneal_epochs if self.noise_anneal_start is None
                 else self.noise_anneal_start - 1)
        return start, start + self.noise_anneal_epochs - 1


@dataclasses.dataclass(frozen=True)
class ModelSpec(_Spec):
    """One `[[models]]` entry: architecture, quantization and how it is trained."""

    name: str
    architecture: str
    quantization: str
    options: Mapping[str, Any]
    jacobian: Optional[Mapping[str, float]] = None
    adversary: Optional[Mapping[str, Any]] = None
    distill: Optional[Mapping[str, Any]] = None
    exits: Optional[Mapping[str, Any]] = None
    neokd: Optional[Mapping[str, Any]] = None
    seeds: Optional[tuple] = None  # the experiment's seeds this model runs with (None: all)
    early_stopping: Optional[Mapping[str, Any]] = None  # {examples, steps, collapse}: `callbacks.RobustEarlyStopping`

    # Keys the experiment file left out stay out of the canonical form (and of the fingerprint).
    _omit_when_none = ("jacobian", "adversary", "distill", "exits", "neokd", "seeds", "early_stopping")

    @property
    def file_name(self):
        """The name used for export files and C arrays (an identifier)."""
        return self.name.replace("-", "_")

    def jacobian_regularizer(self):
        """The `JacobianRegularizer` of the `jacobian` table, or None without one.

        The table is either the weights themselves (`{ input = 0.01, relu_2 = 0.01 }`) or, to set more than
        the weights, `{ layers = { input = 0.01, ... }, batch_fraction = 0.25 }`.
        """
        if not self.jacobian:
            return None
        from tinyrobust.jacobian import JacobianRegularizer

        layers, fraction = jacobian_settings(self.jacobian)
        return JacobianRegularizer(layers=dict(layers), batch_fraction=fraction)

    def adversarial_training(self, input_range, seed):
        """The `AdversarialTraining` of the `adversary` table on inputs in `input_range`, or None without one."""
        if not self.adversary:
            return None
        from tinyrobust.training import AdversarialTraining

        return AdversarialTraining(input_range=input_range, seed=seed, **self.adversary)


@dataclasses.dataclass(frozen=True)
class ThreatSpec(_Spec):
    """One `[threat_models.<norm>]` table."""

    norm: str
    epsilons: tuple
    examples: int
    attacks: Mapping[str, Mapping[str, Any]]
    suite: Mapping[str, Any]
    multi_exit: Mapping[str, Any]
    deployed_epsilons: Optional[tuple] = None  # the radii of the deployed attacks; None: every radius

    _omit_when_none = ("deployed_epsilons",)

    def to_dict(self):
        """The table as the experiment file gives it (without `norm`, its key)."""
        return {k: v for k, v in super().to_dict().items() if k != "norm"}


@dataclasses.dataclass(frozen=True)
class ExportSpec(_Spec):
    """`[export]`: the shipped artifact and the deployed evaluation."""

    enabled: bool
    compress: bool
    calibration_size: int
    parity_examples: int
    deployed_examples: int
    deployed_attacks: tuple
    deployed_queries: int
    arena_limit: Optional[float] = None  # compressed files: largest arena / int8 arena (None: the smallest flash)

    # None (the smallest flash, no channel groups) is what exports made before the key existed did.
    _omit_when_none = ("arena_limit",)


@dataclasses.dataclass(frozen=True)
class Experiment(_Spec):
    """A whole validated experiment (one profile)."""

    name: str
    dataset: str
    seed: int
    seeds: tuple
    profile: Optional[str]
    train: TrainSpec
    models: tuple
    threat_models: Mapping[str, ThreatSpec]
    export: ExportSpec
    description: Optional[str] = None
    defined_models: Optional[tuple] = None

    _omit_when_none = ("description", "defined_models")

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "threat_models", types.MappingProxyType(dict(self.threat_models)))
        for name in ("seeds", "defined_models"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_dict(cls, config):
        """Builds the specs from a validated experiment dict (`config.load`'s checks already passed)."""
        return cls(
            name=config["name"], dataset=config["dataset"], seed=config["seed"], seeds=config["seeds"],
            profile=config["profile"], train=TrainSpec(**config["train"]),
            models=[ModelSpec(**model) for model in config["models"]],
            threat_models={norm: ThreatSpec(norm=norm, **threat) for norm, threat in config["threat_models"].items()},
            export=ExportSpec(**config["export"]), description=config.get("description"),
            defined_models=config.get("defined_models"))

    def with_seed(self, seed):
        """The same experiment run with one seed, and only the models that run with it (a model's `seeds`)."""
        seeded = dataclasses.replace(self, seed=seed, seeds=(seed,))
        kept = tuple(m for m in self.models if m.seeds is None or seed in m.seeds)
        if len(kept) == len(self.models):
            return seeded
        return dataclasses.replace(seeded, models=kept,
                                   defined_models=self.defined_models or tuple(m.name for m in self.models))

    def with_models(self, names):
        """The experiment restricted to the named models; `defined_models` keeps every name in file order."""
        return dataclasses.replace(self, models=tuple(m for m in self.models if m.name in names),
                                   defined_models=self.defined_models or tuple(m.name for m in self.models))

    def model(self, name):
        """The spec of the model called `name`, or None."""
        return next((m for m in self.models if m.name == name), None)
