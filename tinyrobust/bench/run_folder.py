"""One run folder: where every artifact of a seed's run lives, its lock, reuse and the earlier-work check.

Layout (one folder per seed; `seed_<s>/` under the output folder with several seeds):

    models/<name>.keras, .train.json, .history.csv   trained model, its record, per-epoch history
    checkpoints/<name>/                                unfinished training (`BackupAndRestore`, clock)
    logs/<name>/                                       TensorBoard
    export/<file_name>.tflite, .int8.tflite, .h, .cc, .parity.json, .compression.json
    export/<name>__<norm>.deployed.json                the deployed evaluation of one threat model
    results/<name>__<norm>.json                        one result file
"""

import contextlib
import json
import pathlib
import shutil
import warnings

from tinyrobust import files
from tinyrobust.bench import fingerprints

__all__ = ["RunFolder", "read_reusable"]

_NORMS = ("linf", "l2")


def read_reusable(path, read=None):
    """The artifact at `path` read by `read` (default: JSON), or None when it is missing or corrupt.

    A corrupt file (truncated JSON, a broken `.keras`) is named in a warning and
    removed, so the step that writes it runs again.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        return read(path) if read is not None else json.loads(path.read_text())
    except Exception as error:  # noqa: BLE001 - any failure to read means: redo
        warnings.warn(f"{path} is corrupt ({type(error).__name__}: {str(error)[:200]}); it is redone.", stacklevel=2)
        path.unlink()
        return None


class RunFolder:
    """The artifacts of one seed's run of an experiment, by model name.

    Args:
        path: the folder (created when missing).
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __repr__(self):
        return f"RunFolder({str(self.path)!r})"

    # Where each artifact lives.
    def model(self, name):
        """The trained model's `.keras` file."""
        return self.path / "models" / f"{name}.keras"

    def train_record(self, name):
        """The training record: settings, fingerprint, seconds, the model file's digest."""
        return self.path / "models" / f"{name}.train.json"

    def history(self, name):
        """The per-epoch training history (CSV)."""
        return self.path / "models" / f"{name}.history.csv"

    def checkpoints(self, name):
        """The folder of an unfinished training run."""
        return self.path / "checkpoints" / name

    def logs(self, name):
        """TensorBoard logs."""
        return self.path / "logs" / name

    def result(self, name, norm):
        """The result file of one model and threat model."""
        return self.path / "results" / f"{name}__{norm}.json"

    @property
    def export_folder(self):
        """Where the exported files go."""
        return self.path / "export"

    def shipped(self, file_name):
        """The shipped `.tflite` (`ModelSpec.file_name`)."""
        return self.export_folder / f"{file_name}.tflite"

    def parity(self, file_name):
        """The parity record of the exported files."""
        return self.export_folder / f"{file_name}.parity.json"

    def deployed(self, name, norm):
        """The deployed evaluation of one model and threat model."""
        return self.export_folder / f"{name}__{norm}.deployed.json"

    def teacher(self, spec, seed):
        """The `.keras` file of the teacher of the student `spec` trained with `seed`: a path given in the file,
        this folder's model, or with `distill.teacher_seed` its sibling seed folder's."""
        name = spec.distill["teacher"]
        if name.endswith(".keras"):
            return pathlib.Path(name)
        return self.teacher_folder(spec, seed).model(name)

    def teacher_folder(self, spec, seed):
        """The run folder whose `models/` holds the teacher of `spec`: this one, or with
        `distill.teacher_seed` (one teacher for the students of every seed) that seed's sibling folder."""
        teacher_seed = spec.distill.get("teacher_seed")
        return self if teacher_seed is None or teacher_seed == seed else RunFolder(self.path.parent /
                                                                                 f"seed_{teacher_seed}")

    def reusable(self, path, read=None):
        """`read_reusable(path, read)`: the artifact, or None when missing or corrupt (then removed)."""
        return read_reusable(path, read)

    @contextlib.contextmanager
    def lock(self):
        """Creates the folder and holds its lock (`files.folder_lock`): two runs never share a folder.

        Raises:
            ValueError: the path is a file, or the folder cannot be created.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"The output folder is a file. Received: out_dir={str(self.path)!r}")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"Cannot create the output folder ({error.strerror}). "
                             f"Received: out_dir={str(self.path)!r}") from None
        with files.folder_lock(self.path):
            yield self

    def check_earlier_work(self, settings_of):
        """Stops before any work when the folder holds trained models or training checkpoints made with other
        settings.

        Args:
            settings_of: `{model name: the settings that decide it now}`.

        Raises:
            ExperimentError: naming each artifact and the settings that changed.
        """
        from tinyrobust.bench.config import ExperimentError

        problems = []
        for name, settings in settings_of.items():
            expected = fingerprints.fingerprint(settings)
            candidates = []
            if self.model(name).is_file():
                candidates.append((f"models/{name}.keras", self.train_record(name)))
            if self.checkpoints(name).is_dir():
                candidates.append((f"checkpoints/{name} (unfinished training)",
                                   self.checkpoints(name) / "settings.json"))
            for label, record_path in candidates:
                record = read_reusable(record_path) or {}
                if record.get("fingerprint") != expected:
                    changed = fingerprints.changes(record.get("settings"), settings)
                    problems.append(f"  {label}: " + "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""))
        if problems:
            raise ExperimentError(
                f"{str(self.path)!r} holds work done with other settings:\n" + "\n".join(problems) + "\n"
                "Rerun with --fresh to delete it and start these models over, or use another --out. "
                f"Received: out_dir={str(self.path)!r}")

    def delete_earlier_work(self, specs, say):
        """`--fresh`: removes every artifact of the models `specs` (other models' files stay)."""
        for spec in specs:
            name, stem = spec.name, spec.file_name
            # The model's own files by their exact names: a glob such as `a.*` would also take model `a.b`'s.
            doomed = [self.checkpoints(name), self.logs(name), self.model(name), self.train_record(name),
                      self.history(name), *(self.result(name, norm) for norm in _NORMS),
                      *(self.export_folder / f"{stem}{suffix}" for suffix in (".tflite", ".int8.tflite", ".h", ".cc",
                                                                              ".parity.json", ".compression.json")),
                      *(self.deployed(name, norm) for norm in _NORMS)]
            doomed = [path for path in doomed if path.exists()]
            for path in doomed:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if doomed:
                say(f"{name}: earlier work deleted (--fresh)")

    def drop_foreign_model(self, name):
        """Deletes (with a warning) a trained model file whose bytes are not the ones its record describes, e.g.
        another model's `.keras` copied over it: it is trained again rather than evaluated under this name."""
        path, record_path = self.model(name), self.train_record(name)
        record = read_reusable(record_path)
        expected = (record or {}).get("model_sha256")  # absent in records from before the digest
        if expected is None or not path.is_file() or fingerprints.file_digest(path) == expected:
            return
        warnings.warn(f"{path} is not the file its record ({record_path.name}) describes (replaced or changed?); "
                      "it is trained again.", stacklevel=3)
        path.unlink()

    def drop_unreadable_checkpoint(self, name):
        """Deletes a training checkpoint neither of whose two copies can be read, with a warning: the model then
        trains from its first epoch (its held-out selection and clock start over with it) instead of failing
        every rerun with a traceback."""
        folder = self.checkpoints(name)
        latest, previous = folder / "latest.weights.h5", folder / "latest.weights.h5.bkp"
        if not latest.exists() or _readable_weights(latest) or (previous.exists() and _readable_weights(previous)):
            return
        warnings.warn(f"The training checkpoint of {name!r} ({latest}) is corrupt (cut short by a kill or a full "
                      f"disk?); {name!r} trains again from its first epoch", stacklevel=3)
        for path in folder.iterdir():
            if path.name != "settings.json":
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _readable_weights(path):
    """True when `path` is an HDF5 file that opens (a checkpoint cut short by a kill or a full disk does not)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return len(handle.keys()) > 0
    except (OSError, ValueError):
        return False
