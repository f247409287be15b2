"""Settings chosen on the validation split: train every candidate of a sweep, measure, select, record.

`run` trains each candidate of a `config.Sweep` (`[[sweeps]]` in the
experiment file) with the experiment's recipe, measures it on the
*validation* split only (held out of the training split by
`tinyrobust.data`; the test split is never read), selects one by the sweep's
rule and writes the record: every candidate's settings and validation
numbers, the choice and why. Experiments then take the chosen settings from
the record, so a claim tested on the test split was not tuned on it.

Validation numbers: clean accuracy on the whole validation split, and
accuracy under PGD (`steps` steps, step eps / 4, one random start) at
`epsilon` on its first `examples` images, both of the model's attack view
(`export.fold_quantized_weights`, as the bench attacks). A multi-exit model
counts its weakest exit: the lowest clean accuracy over exits and the lowest
accuracy over exits under the average multi-exit PGD.
"""

import json
import pathlib

import numpy as np

from tinyrobust import attacks, data, export, files, multiexit
from tinyrobust.attacks.base import labels_of, predict
from tinyrobust.bench import fingerprints, runner

__all__ = ["run", "select", "validation_accuracy"]


def validation_accuracy(model, config, epsilon, examples, steps, multi_exit=False):
    """`(clean, robust)` of a trained model on the validation split (see the module's docstring); robust is
    None when `epsilon` is 0."""
    recipe = config.train
    x, y = data.load_arrays(config.dataset, "validation", validation_fraction=recipe.validation_fraction,
                            seed=config.seed)
    input_range = data.info(config.dataset).input_range
    if multi_exit:
        outputs = multiexit.exit_accuracies(model, x, y)
        clean = float(min(outputs))
    else:
        viewed = export.fold_quantized_weights(model)
        clean = float(np.mean(labels_of(predict(viewed, x)) == y))
    if not epsilon:
        return clean, None
    x_a, y_a = x[:examples], y[:examples]
    if multi_exit:
        attack = multiexit.MultiExitPGD(epsilon, target="average", steps=steps, rel_step_size=0.25,
                                        input_range=input_range, seed=config.seed)
        x_adv = attack(model, x_a, y_a)
        robust = float(min(multiexit.exit_accuracies(model, x_adv, y_a)))
    else:
        attack = attacks.PGD(epsilon, steps=steps, rel_step_size=0.25, input_range=input_range, seed=config.seed)
        robust = float(np.mean(labels_of(predict(viewed, attack(viewed, x_a, y_a))) == y_a))
    return clean, robust


def select(rows, rule, min_clean=None):
    """The index of the chosen candidate and the reason, from rows with `clean` and `robust`.

    Rules: "clean" (highest clean), "robust" (highest robust), "robust_with_clean" (highest robust among rows
    with clean >= `min_clean`, else highest clean); ties go to the earlier candidate.
    """
    if rule == "clean":
        index = max(range(len(rows)), key=lambda i: (rows[i]["clean"], -i))
        return index, "highest clean validation accuracy"
    qualified = [i for i in range(len(rows)) if rule == "robust" or rows[i]["clean"] >= min_clean]
    if not qualified:
        index = max(range(len(rows)), key=lambda i: (rows[i]["clean"], -i))
        return index, f"no candidate reached {min_clean:.1%} clean: highest clean validation accuracy"
    index = max(qualified, key=lambda i: (rows[i]["robust"], -i))
    floor = "" if rule == "robust" else f" among those with at least {min_clean:.1%} clean"
    return index, f"highest validation accuracy under PGD-{{steps}} at eps {{epsilon:g}}{floor}"


def run(sweep, out_dir, command="", verbose=True, fresh=False):
    """Trains and measures every candidate of `sweep`, selects one, and writes `<out>/sweeps/<model>.json`
    and `.md`.

    Candidates with the same recipe share one run folder (`<out>/sweeps/<model>/<recipe>/`), so a
    distilled student's teacher trains once per recipe; an interrupted sweep resumes there.

    Returns:
        The record (a dict).
    """
    out = pathlib.Path(out_dir)
    first = sweep.candidates[0][1]
    _, y_val = data.load_arrays(first.dataset, "validation", validation_fraction=first.train.validation_fraction,
                                seed=first.seed)
    if sweep.examples > len(y_val):  # before any training: nothing is cut to fit
        raise ValueError(f"The sweep of {sweep.model!r} attacks more validation examples than the split holds "
                         f"({len(y_val)}). Received: examples={sweep.examples}")
    rows = []
    for k, (settings, experiment) in enumerate(sweep.candidates, start=1):
        recipe = fingerprints.fingerprint(experiment.train.to_dict())
        folder = out / "sweeps" / sweep.model / f"recipe_{recipe}"
        trained = runner.train_all(experiment, folder, verbose=verbose, fresh=fresh)
        spec = experiment.models[-1]
        model, seconds = trained[spec.name]
        clean, robust = validation_accuracy(model, experiment, sweep.epsilon if sweep.select != "clean" else 0.0,
                                            sweep.examples, sweep.steps, multi_exit=bool(spec.exits))
        rows.append({"candidate": k, "name": spec.name, "settings": settings, "clean": clean, "robust": robust,
                     "train_seconds": seconds, "folder": str(folder.relative_to(out))})
        if verbose:
            shown = "" if robust is None else f", robust {robust:.3f}"
            print(f"{spec.name} {settings}: validation clean {clean:.3f}{shown}", flush=True)
    index, reason = select(rows, sweep.select, sweep.min_clean)
    reason = reason.format(steps=sweep.steps, epsilon=sweep.epsilon)
    record = {"experiment": first.name, "profile": first.profile, "dataset": first.dataset, "seed": first.seed,
              "model": sweep.model, "select": sweep.select, "epsilon": sweep.epsilon, "min_clean": sweep.min_clean,
              "examples": sweep.examples, "steps": sweep.steps, "split": "validation",
              "validation_fraction": first.train.validation_fraction, "grid": sweep.grid, "candidates": rows,
              "chosen": rows[index]["candidate"], "chosen_settings": rows[index]["settings"], "reason": reason,
              "command": command, "versions": runner.versions(), "machine": runner.machine()}
    files.write_json(out / "sweeps" / f"{sweep.model}.json", record)
    files.write_atomically(out / "sweeps" / f"{sweep.model}.md", markdown(record))
    return record


def markdown(record):
    """The sweep record as a Markdown table."""
    keys = list(record["grid"])
    robust = record["select"] != "clean"
    head = ["candidate", *keys, "validation clean", *(["validation robust"] if robust else []), "train s", ""]
    lines = [f"# Sweep of `{record['model']}` ({record['experiment']}, profile {record['profile']}, seed "
             f"{record['seed']})", "",
             f"Selected on the validation split ({record['validation_fraction']:.0%} of the training data, never "
             f"the test split): {record['reason']}. Chosen: candidate {record['chosen']} "
             f"{json.dumps(record['chosen_settings'])}.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in record["candidates"]:
        cells = [str(row["candidate"]), *(json.dumps(row["settings"][k]) for k in keys), f"{100 * row['clean']:.1f}%"]
        if robust:
            cells.append(f"{100 * row['robust']:.1f}%")
        cells += [f"{row['train_seconds']:.0f}", "chosen" if row["candidate"] == record["chosen"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if record["command"]:
        lines += ["", f"Command: `{record['command']}`"]
    return "\n".join(lines) + "\n"
