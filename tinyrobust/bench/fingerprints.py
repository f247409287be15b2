"""Fingerprints: exactly the settings that produced each artifact of a run, and a hash of them.

Every artifact the runner writes (trained model, training checkpoint, result
file, export, deployed evaluation) records its settings and their fingerprint.
An artifact is reused only when its fingerprint equals the one the current
experiment gives; `changes` names what differs.
"""

import hashlib
import json

from tinyrobust import files

__all__ = ["fingerprint", "changes", "file_digest", "model_settings", "export_settings", "result_settings", "shared_settings",
           "NUMERIC_PACKAGES"]

# Packages whose version can change a number (training, attacks, the int8 converter, the TFLM interpreter).
NUMERIC_PACKAGES = ("tensorflow", "keras", "qkeras", "numpy", "tinyrobust")


def _canonical(settings):
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(settings):
    """The SHA-256 (16 hex digits) of the canonical JSON of `settings`."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:16]


def _flat(value, prefix=""):
    if isinstance(value, dict):
        items = {}
        for key, item in value.items():
            items.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return items or {prefix: {}}
    return {prefix: value}


def changes(old, new):
    """What differs between two settings dicts, one `key: old -> new` line per dotted key.

    Args:
        old: the recorded settings (None or not a dict: unknown).
        new: the current settings.

    Returns:
        A list of strings, empty when the settings are equal.
    """
    if not isinstance(old, dict):
        return ["no record of the settings that produced it"]
    before, after = _flat(old), _flat(new)
    lines = []
    for key in sorted(set(before) | set(after), key=str):
        was, now = (_canonical(side.get(key, "<unset>")) for side in (before, after))
        if was != now:
            lines.append(f"{key}: {was} -> {now}")
    return lines


def _versions(versions, extra=()):
    return {name: versions.get(name) for name in (*NUMERIC_PACKAGES, *extra)}


def model_settings(dataset, seed, recipe, spec, versions, teacher=None, data_digest=None):
    """The settings that decide a trained model.

    Args:
        dataset: the data set's name.
        seed: the run's seed.
        recipe: the `specs.TrainSpec`.
        spec: the model's `specs.ModelSpec`.
        versions: package versions (`runner.versions()`).
        teacher: the fingerprint of the teacher model (distillation), or None.
        data_digest: `tinyrobust.data.digest` of the data set, or None (left out, as before it existed).

    Returns:
        A JSON-serialisable dict.
    """
    model = {k: v for k, v in spec.to_dict().items() if k != "seeds"}  # which seeds run it changes no model
    settings = {"dataset": dataset, "seed": seed, "train": recipe.to_dict(), "model": model,
                "teacher": teacher, "versions": _versions(versions)}
    if data_digest is not None:
        settings["data"] = data_digest
    return settings


def export_settings(export, model_fingerprint, versions):
    """The settings that decide the exported files and their parity record (`export`: the `specs.ExportSpec`)."""
    keys = ("compress", "calibration_size", "parity_examples", "arena_limit")
    settings = export.to_dict()
    return {"model": model_fingerprint, "export": {k: settings[k] for k in keys if k in settings},
            "versions": _versions(versions, ("tflite_micro",))}


def result_settings(threat, export, model_fingerprint, versions):
    """The settings that decide one result file (`threat`: the `specs.ThreatSpec`; `export`: the
    `specs.ExportSpec`, whose deployed evaluation is part of the result)."""
    return {"model": model_fingerprint, "threat_model": {**threat.to_dict(), "norm": threat.norm},
            "export": export.to_dict(), "versions": _versions(versions, ("tflite_micro",))}


def shared_settings(result):
    """The part of a result's settings that every result of one table must share (all but the model)."""
    settings = result.get("settings") or {}
    return {"experiment": result.get("experiment"), "profile": result.get("profile"), "dataset": result.get("dataset"),
            "train": (settings.get("model_settings") or {}).get("train"),
            "threat_model": settings.get("threat_model"), "export": settings.get("export"),
            "versions": settings.get("versions")}


def file_digest(path):
    """The SHA-256 (16 hex digits) of a file's bytes (`files.file_sha256`)."""
    return files.file_sha256(path)
