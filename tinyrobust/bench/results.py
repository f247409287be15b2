"""Result files: one JSON per (model, threat model), and the tables and plots built from them.

The format of `results/<model>__<norm>.json` is the typed record
`tinyrobust.bench.schema.Result` (field types and meanings), from which its
JSON Schema, `benchmarks/results/result.schema.json`, is generated.
"""

import csv
import itertools
import json
import pathlib
import warnings

from tinyrobust import files
from tinyrobust.bench import fingerprints, schema

SCHEMA_VERSION = 1


def validate(result):
    """Raises ValueError naming the first field of `result` that breaks the format (`schema.Result`) or the
    rules between fields (accuracies in [0, 1], one entry per eps); returns `result`."""
    if not isinstance(result, dict):
        raise ValueError(f"Expected a result object. Received: {type(result).__name__}")
    schema.check(result)
    if result["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"Expected schema_version {SCHEMA_VERSION}. Received: schema_version={result['schema_version']}")
    epsilons = [str(e) for e in result["threat_model"].get("epsilons", [])]
    for attack, per_eps in result["robust_accuracy"].items():
        if sorted(per_eps) != sorted(epsilons):
            raise ValueError(f"Result `robust_accuracy.{attack}` has epsilons {sorted(per_eps)}, expected {epsilons}")
        for value in per_eps.values():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Accuracy out of [0, 1] in `robust_accuracy.{attack}`. Received: {value}")
    clean = result["clean_accuracy"]
    if not 0.0 <= clean <= 1.0:
        raise ValueError(f"Accuracy out of [0, 1]. Received: clean_accuracy={clean}")
    # The rules a measurement cannot break: the worst case is per example over every attack, each attack's
    # accuracy counts only examples also right on clean input, and the worst case never rises with eps.
    worst = result["worst_case"]
    if sorted(worst) != sorted(epsilons):
        raise ValueError(f"Result `worst_case` has epsilons {sorted(worst)}, expected {epsilons}")
    tolerance = 1e-9
    for eps, value in worst.items():
        if not 0.0 <= value <= clean + tolerance:
            raise ValueError(f"Worst case above clean accuracy ({clean}) or out of [0, 1]. Received: "
                             f"worst_case.{eps}={value}")
        for attack, per_eps in result["robust_accuracy"].items():
            if per_eps[eps] > clean + tolerance or value > per_eps[eps] + tolerance:
                raise ValueError(f"Expected worst case <= every attack <= clean accuracy ({clean}) at eps {eps}. "
                                 f"Received: worst_case.{eps}={value}, robust_accuracy.{attack}.{eps}={per_eps[eps]}")
    ordered = sorted(worst, key=float)
    for smaller, larger in zip(ordered, ordered[1:]):
        if worst[larger] > worst[smaller] + tolerance:
            raise ValueError(f"The worst case rises with eps. Received: worst_case.{smaller}={worst[smaller]}, "
                             f"worst_case.{larger}={worst[larger]}")
    if result.get("multi_exit") is not None:
        _validate_multi_exit(result["multi_exit"], epsilons)
    return result


def _validate_multi_exit(record, epsilons):
    exits = len(record.get("exit_macs", []))
    if not exits or len(record.get("clean", [])) != exits:
        raise ValueError(f"Result `multi_exit` needs `exit_macs` and `clean` with one entry per exit. "
                         f"Received: exit_macs={record.get('exit_macs')!r}, clean={record.get('clean')!r}")
    accuracies = [("multi_exit.clean", record["clean"])]
    for attack, per_eps in record.get("attacks", {}).items():
        if sorted(per_eps) != sorted(epsilons):
            raise ValueError(f"Result `multi_exit.attacks.{attack}` has epsilons {sorted(per_eps)}, expected {epsilons}")
        accuracies += [(f"multi_exit.attacks.{attack}.{e}", values) for e, values in per_eps.items()]
    for where, values in accuracies:
        if len(values) != exits or not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"Expected {exits} accuracies in [0, 1] in `{where}`. Received: {values!r}")


def write(result, path):
    """Validates and writes one result file atomically."""
    validate(result)
    return files.write_json(path, result, sort_keys=True)


def read_all(folder):
    """Every valid result file under `folder` (searched recursively), in path order (seed folder, model, norm)."""
    results = []
    for path in sorted(pathlib.Path(folder).rglob("*.json")):
        try:
            result = json.loads(path.read_text())
        except ValueError as error:
            if path.parent.name == "results":  # a result file, not some other JSON of the run
                warnings.warn(f"{path} is corrupt ({error}); its model is missing from the report. Run the bench "
                              f"again to redo it.", stacklevel=2)
            continue
        if isinstance(result, dict) and result.get("schema_version") == SCHEMA_VERSION:
            try:
                results.append(validate(result))
            except ValueError as error:  # named, so it can be found and redone
                raise ValueError(f"{path}: {error}") from None
    if not results:
        raise FileNotFoundError(f"No result files (schema version {SCHEMA_VERSION}) under {str(folder)!r}")
    return results


def _percent(value):
    return "-" if value is None else f"{100 * value:.1f}"


def _groups(rows, key=lambda r: r["model"]["name"]):
    """Results with the same `key` (by default the same model: one per seed) together, in first-seen order."""
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return list(groups.values())


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _stat(group, get):
    """Percent cell of `get(result)` over a group: the value, or mean ± standard deviation over seeds."""
    values = [v for v in (get(r) for r in group) if v is not None]
    if len(values) < 2:
        return _percent(_mean(values))
    mean = _mean(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _attack_columns(rows):
    """Attack names of `rows` in a fixed order (the same for fresh and reloaded results): single attacks by
    name, then each suite followed by its stages."""
    names = {a for r in rows for a in r["robust_accuracy"]}
    kinds = {a: k for r in rows for a, k in r.get("attack_kinds", {}).items()}
    return sorted(names, key=lambda a: (kinds.get(a) == "suite" or "/" in a, a))


def _deployed(result):
    """The result's deployed-model record, or {} when there is none."""
    return result.get("deployed") or {}


def _deployed_keras_accuracy(record):
    """The Keras model's clean accuracy on the deployed columns' examples (None in records from before they
    shared one example set, whose `keras_accuracy` came from the parity set)."""
    return record.get("keras_accuracy") if "worst_case" in record else None


def _label(result, seeds):
    """The model's name, with its seed when the results hold several seeds."""
    name = result["model"]["name"]
    return name if len(seeds) == 1 else f"{name} (seed {result['seed']})"


SHORT = ("model", "quant.", "test split", "clean", "worst", "TFLM worst", "flash KB", "arena KB")


def _short(header, lines):
    """The columns of `SHORT` (per eps where they have one) out of a full table's header and rows."""
    keep = [i for i, name in enumerate(header)
            if name in SHORT or name.rsplit(" ", 1)[0] in ("worst", "TFLM worst")]
    return [[row[i] for i in keep] for row in [header, *lines]]


def _markdown(rows):
    header, *body = rows
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header), *("| " + " | ".join(r) + " |" for r in body)]


def table(results, wide=False):
    """Markdown tables, one per threat model, in the layout of the papers.

    The short table (what fits a terminal): per model, clean accuracy on the
    whole test split and on the attacked examples, the worst case per eps,
    the deployed (TFLite Micro) file's worst case, and its flash and arena
    kilobytes. With `wide`, a second table adds every column: each attack at
    each eps, the deployed file's clean and per-attack accuracy, the plain
    int8 file's flash and the ideal packed weight bytes. Accuracies in
    percent; a model run with several seeds shows mean ± sample standard
    deviation over them.

    Args:
        results: result dicts.
        wide: add the table of every column.

    Returns:
        Markdown text.
    """
    sections = []
    for norm in sorted({r["threat_model"]["norm"] for r in results}):
        rows = [r for r in results if r["threat_model"]["norm"] == norm]
        groups = _groups(rows)
        epsilons = [str(e) for e in rows[0]["threat_model"]["epsilons"]]
        attacks = _attack_columns(rows)
        deployed = sorted({a for r in rows for a in (_deployed(r).get("robust_accuracy") or {})})
        attacked = {e for r in rows for e in (_deployed(r).get("worst_case") or {})}  # `deployed_epsilons`
        deployed_epsilons = [e for e in epsilons if e in attacked] or epsilons
        seeds = sorted({r["seed"] for r in rows})
        header = ["model", "quant.", "test split", "clean"] + [f"{a} {e}" for a in attacks for e in epsilons]
        header += [f"worst {e}" for e in epsilons] + ["Keras clean (TFLM set)", "TFLM clean"]
        header += [f"TFLM {a} {e}" for a in deployed for e in deployed_epsilons]
        header += [f"TFLM worst {e}" for e in deployed_epsilons]
        header += ["flash KB", "arena KB", "int8 flash KB", "ideal packed KB"]
        seed_note = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± std over seeds {', '.join(map(str, seeds))}"
        title = (f"### {rows[0]['experiment']} ({rows[0]['dataset']}, {norm}, {rows[0]['threat_model']['examples']} "
                 f"test examples, profile {rows[0].get('profile') or 'base'}, {seed_note})")
        body = []
        for group in groups:
            first = group[0]
            d = _deployed(first)
            name = first["model"]["name"]
            if len(seeds) > 1 and len(group) < len(seeds):  # a model run with only some of the seeds
                name += f" (seed{'s' * (len(group) > 1)} {', '.join(str(r['seed']) for r in group)})"
            cells = [name, first["model"]["quantization"],
                     _stat(group, lambda r: (r.get("test_accuracy") or {}).get("accuracy")),
                     _stat(group, lambda r: r["clean_accuracy"])]
            cells += [_stat(group, lambda r, a=a, e=e: r["robust_accuracy"].get(a, {}).get(e))
                      for a in attacks for e in epsilons]
            cells += [_stat(group, lambda r, e=e: r["worst_case"].get(e)) for e in epsilons]
            cells += [_stat(group, lambda r: _deployed_keras_accuracy(_deployed(r))),
                      _stat(group, lambda r: _deployed(r).get("clean_accuracy"))]
            cells += [_stat(group, lambda r, a=a, e=e: (_deployed(r).get("robust_accuracy") or {}).get(a, {}).get(e))
                      for a in deployed for e in deployed_epsilons]
            cells += [_stat(group, lambda r, e=e: (_deployed(r).get("worst_case") or {}).get(e))
                      for e in deployed_epsilons]
            cells += ["-" if not d else f"{d['model_bytes'] / 1024:.1f}",
                      "-" if not d else f"{d['arena_bytes'] / 1024:.1f}",
                      "-" if not d else f"{d.get('int8_model_bytes', d['model_bytes']) / 1024:.1f}",
                      f"{first['model']['packed_bytes'] / 1024:.1f}"]
            body.append(cells)
        lines = [title, "", *_markdown(_short(header, body))]
        if wide:
            lines += ["", "Every column (accuracy in %, sizes in KB):", "", *_markdown([header, *body])]
        # Flags by name: a report rebuilt from the JSON files (written with sorted keys) matches the run's own.
        flagged = [f"- {_label(r, seeds)}: {flag}: {message}" for r in rows
                   for flag, message in sorted(r["checks"].items())]
        flagged += [f"- {_label(r, seeds)} (deployed): {flag}: {message}" for r in rows
                    for flag, message in sorted((_deployed(r).get("checks") or {}).items())]
        split = sorted({r["test_accuracy"]["examples"] for r in rows if r.get("test_accuracy")})
        lines += ["", f"test split: clean accuracy on the whole test split ({', '.join(f'{n:,}' for n in split) or '-'} "
                      f"examples; '-' in records from before it); clean and the attack columns: its first "
                      f"{rows[0]['threat_model']['examples']} examples."]
        examples = sorted({_deployed(r)["examples"] for r in rows if "worst_case" in _deployed(r)})
        if examples:
            lines += ["", f"Keras clean (TFLM set), TFLM clean and the TFLM columns: the first "
                          f"{', '.join(map(str, examples))} test examples, the same for every deployed column; TFLM "
                          f"worst: per example over clean and every deployed attack."]
        if flagged:
            lines += ["", "Honest-evaluation flags:", *flagged]
        selected = [f"- {_label(r, seeds)}: {_early_stopping_note(r)}" for r in rows if r.get("early_stopping")]
        if selected:
            lines += ["", "Early stopping (PGD on held-out training examples after each epoch; the best epoch's "
                          "weights are the model's):", *selected]
        mixed = mixed_settings(rows)
        if mixed:
            lines += ["", "Mixed settings: these rows do not all come from the same experiment settings (rerun "
                          "them into one folder):", *mixed]
        sections.append("\n".join(lines))
        multi = [r for r in rows if r.get("multi_exit")]
        if multi:
            sections.append(_multi_exit_table(multi, epsilons, seeds))
    return "\n\n".join(sections) + "\n"


def _early_stopping_note(result):
    """One line on how a result's model was selected: best epoch, and the collapse that stopped training."""
    record, table = result["early_stopping"], result["model"].get("early_stopping") or {}
    history = record["robust_accuracy"]
    best = record["best_epoch"]
    line = (f"PGD-{table.get('steps', '?')} on {table.get('examples', '?')} examples, "
            f"best {100 * history[best - 1]:.1f}% after epoch {best} of {len(history)} run")
    stopped = record.get("stopped_epoch")
    if stopped is not None:
        line += f"; stopped after epoch {stopped} ({100 * history[stopped - 1]:.1f}%: a collapse)"
    return line


def mixed_settings(results):
    """Lines naming each result whose shared settings (everything but its model and seed) differ from the
    first result's, or that records no settings; empty when all agree."""
    first, lines = results[0], []
    reference = fingerprints.shared_settings(first)
    for result in results:
        label = f"{result['model']['name']} (seed {result['seed']})"
        if "fingerprint" not in result:
            lines.append(f"- {label}: records no settings (written before fingerprints); rerun it")
        elif result is not first:
            changed = fingerprints.changes(reference, fingerprints.shared_settings(result))
            if changed:
                lines.append(f"- {label} vs {first['model']['name']}: " + "; ".join(changed[:4]))
    return lines


def _multi_exit_table(rows, epsilons, seeds):
    """Per-exit accuracy (clean and under each multi-exit attack) and early-exit accuracy and compute."""
    attacks = list(dict.fromkeys(a for r in rows for a in r["multi_exit"]["attacks"]))
    header = ["model", "exit", "MACs", "clean"] + [f"{a} {e}" for a in attacks for e in epsilons]
    lines = [f"#### Multi-exit models ({rows[0]['threat_model']['norm']}): accuracy per exit "
             "(the last exit is the backbone's)", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        m = r["multi_exit"]
        for k, macs in enumerate(m["exit_macs"]):
            cells = [_label(r, seeds), str(k + 1), f"{macs:,}", _percent(m["clean"][k])]
            cells += [_percent(m["attacks"].get(a, {}).get(e, [None] * (k + 1))[k]) for a in attacks for e in epsilons]
            lines.append("| " + " | ".join(cells) + " |")
    header = ["model", "threshold", "clean", "compute"]
    header += [f"{a} {e}" for a in attacks for e in epsilons]
    lines += ["", "Early exit at a confidence threshold: accuracy, and compute relative to running every exit "
              "(in brackets)", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        early = r["multi_exit"]["early_exit"]
        for threshold, clean in early["clean"].items():
            cells = [_label(r, seeds), threshold, _percent(clean["accuracy"]), f"{clean['relative_compute']:.2f}"]
            for a in attacks:
                for e in epsilons:
                    record = early.get(a, {}).get(e, {}).get(threshold)
                    cells.append("-" if record is None else
                                 f"{_percent(record['accuracy'])} ({record['relative_compute']:.2f})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_history(path):
    """A training history CSV (`keras.callbacks.CSVLogger`) as `{column: [value per epoch]}`, epochs in order; an
    epoch written twice (trained again after an interruption) counts once, with its last values."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):
            return None  # Keras writes "NA" for a metric an epoch did not log

    by_epoch = {}
    for row in rows:
        epoch = number(row.get("epoch"))
        if epoch is None:
            continue  # a header repeated by an appending run, or a line cut short
        values = {k: number(v) for k, v in row.items() if k != "epoch" and k is not None}
        by_epoch[int(epoch)] = {k: v for k, v in values.items() if v is not None}
    epochs = sorted(by_epoch)
    columns = sorted({k for values in by_epoch.values() for k in values})
    return {"epoch": [e + 1 for e in epochs], **{c: [by_epoch[e].get(c) for e in epochs] for c in columns}}


def training_curves(run_folder, folder):
    """PNG plots of each trained model's per-epoch history (`models/<name>.history.csv`, one folder per seed):
    its losses in one panel, its accuracies (and held-out robust accuracy) in the other.

    Returns:
        The list of PNG paths written (none for a folder without histories, e.g. committed results).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_folder, folder = pathlib.Path(run_folder), pathlib.Path(folder)
    histories = sorted([*run_folder.glob("models/*.history.csv"), *run_folder.glob("seed_*/models/*.history.csv")])
    written = []
    for path in histories:
        history = read_history(path)
        if not history["epoch"]:
            continue
        name = path.name[: -len(".history.csv")]
        seed = path.parent.parent.name if path.parent.parent.name.startswith("seed_") else None
        figure, (losses, accuracies) = plt.subplots(1, 2, figsize=(9, 3.5))
        for column, values in history.items():
            if column == "epoch" or all(v is None for v in values):
                continue
            axis = accuracies if "accuracy" in column or column.startswith("held_out") else losses
            if axis is losses and not (column == "loss" or column.endswith("loss") or column in _LOSS_TERMS):
                continue  # schedules (learning rate, epsilon and noise scales) are not training curves
            axis.plot(history["epoch"], values, marker="o", label=column)
        for axis, label in ((losses, "loss"), (accuracies, "accuracy")):
            axis.set(xlabel="epoch", ylabel=label)
            if axis.lines:
                axis.legend(fontsize="x-small")
        figure.suptitle(f"{name}{f' ({seed})' if seed else ''}: training history")
        figure.tight_layout()
        target = folder / f"training_{name}{f'_{seed}' if seed else ''}.png"
        folder.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=100)
        plt.close(figure)
        written.append(target)
    return written


_LOSS_TERMS = ("ce", "clean_ce", "robust_kl", "distill", "natural_kl", "nkd", "eokd", "jacobian", "grad_align")


def plots(results, folder):
    """PNG plots: accuracy vs eps per attack (a line per model), and accuracy vs the shipped file's flash and
    TFLite Micro arena bytes.

    A model run with several seeds is drawn at its mean over seeds.

    Returns:
        The list of PNG paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for norm in sorted({r["threat_model"]["norm"] for r in results}):
        rows = [r for r in results if r["threat_model"]["norm"] == norm]
        groups = _groups(rows)
        epsilons = [str(e) for e in rows[0]["threat_model"]["epsilons"]]
        attacks = _attack_columns(rows) + ["worst"]
        for attack in attacks:
            figure, axis = plt.subplots(figsize=(5, 3.5))
            for group in groups:
                curve = [_mean(r["clean_accuracy"] for r in group)]
                for e in epsilons:
                    curve.append(_mean((r["worst_case"] if attack == "worst" else r["robust_accuracy"].get(attack, {})
                                        ).get(e) for r in group))
                points = [(x, v) for x, v in zip([0.0] + [float(e) for e in epsilons], curve) if v is not None]
                axis.plot([x for x, _ in points], [v for _, v in points], marker="o", label=group[0]["model"]["name"])
            axis.set(xlabel=f"epsilon ({norm})", ylabel="accuracy", title=f"{rows[0]['experiment']}: {attack}",
                     ylim=(0, 1))
            axis.legend(fontsize="small")
            figure.tight_layout()
            path = folder / f"accuracy_vs_eps_{norm}_{attack.replace('/', '-')}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written.append(path)
        # Accuracy against the shipped file's flash, and against its TFLite Micro arena (RAM is often the scarcer).
        for measure, key, label, stem in (
                ("flash", "model_bytes", "flash bytes of the shipped .tflite (KB)", "accuracy_vs_size"),
                ("arena", "arena_bytes", "TFLite Micro arena bytes of the shipped .tflite (KB)", "accuracy_vs_arena")):
            figure, axis = plt.subplots(figsize=(5.5, 3.8))
            markers = dict(zip(epsilons, itertools.cycle("x^svDP*")))  # a marker per radius; the colour: the model
            model_handles = []  # in the legend, not as labels by the points: models of one size would overlap
            for i, group in enumerate(groups):
                if not _deployed(group[0]):  # not exported: no shipped file to measure
                    continue
                size = _deployed(group[0])[key] / 1024
                clean = _mean(r["clean_accuracy"] for r in group)
                axis.scatter([size], [clean], marker="o", color=f"C{i}")
                for e, marker in markers.items():
                    worst = _mean(r["worst_case"].get(e) for r in group)
                    if worst is not None:
                        axis.scatter([size], [worst], marker=marker, color=f"C{i}")
                model_handles.append(plt.Rectangle((0, 0), 1, 1, color=f"C{i}", label=group[0]["model"]["name"]))
            axis.legend(handles=model_handles
                        + [plt.Line2D([], [], color="k", marker="o", linestyle="", label="clean")]
                        + [plt.Line2D([], [], color="k", marker=m, linestyle="", label=f"worst, eps {e}")
                           for e, m in markers.items()], fontsize="x-small")
            axis.set(xlabel=label, ylabel="accuracy (mean over seeds)", ylim=(0, 1),
                     title=f"{rows[0]['experiment']}: accuracy vs {measure} ({norm})")
            figure.tight_layout()
            path = folder / f"{stem}_{norm}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written.append(path)
    return written


def _averaged(results):
    """{(model, norm): {"clean": mean, "worst": {eps: mean}}} over the seeds of each model."""
    return {(group[0]["model"]["name"], group[0]["threat_model"]["norm"]): {
                "clean": _mean(r["clean_accuracy"] for r in group),
                "worst": {e: _mean(r["worst_case"].get(e) for r in group) for e in group[0]["worst_case"]}}
            for group in _groups(results, key=lambda r: (r["model"]["name"], r["threat_model"]["norm"]))}


def compare(results_a, results_b):
    """A Markdown table of two result sets side by side (matched by model and threat model; seeds averaged),
    followed by the settings (training, threat model, export, versions) in which the two sets differ."""
    index_a, index_b = _averaged(results_a), _averaged(results_b)
    lines = ["| model | norm | metric | A | B | B - A |", "| --- | --- | --- | --- | --- | --- |"]
    for (model, norm), a in index_a.items():
        b = index_b.get((model, norm))
        if b is None:
            continue
        metrics = [("clean", a["clean"], b["clean"])]
        metrics += [(f"worst {e}", a["worst"][e], b["worst"].get(e)) for e in a["worst"]]
        for name, va, vb in metrics:
            delta = "-" if vb is None or va is None else f"{100 * (vb - va):+.1f}"
            lines.append(f"| {model} | {norm} | {name} | {_percent(va)} | {_percent(vb)} | {delta} |")
    if len(lines) == 2:
        raise ValueError("The two result sets share no (model, threat model) pair")
    differing = []
    for norm in sorted({r["threat_model"]["norm"] for r in results_a}):
        a = [r for r in results_a if r["threat_model"]["norm"] == norm]
        b = [r for r in results_b if r["threat_model"]["norm"] == norm]
        if b:
            changed = fingerprints.changes(fingerprints.shared_settings(a[0]), fingerprints.shared_settings(b[0]))
            differing += [f"- {norm}: {line}" for line in changed if not line.startswith(("experiment:", "profile:"))]
    if differing:
        lines += ["", "Settings differ between A and B (beyond the experiment and profile), so differences may not "
                      "come from the models alone:", *differing]
    return "\n".join(lines) + "\n"
