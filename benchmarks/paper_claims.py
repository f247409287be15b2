"""The papers' claims, measured on the committed offline runs: one row per claim, paired by seed.

The claims of the papers this project starts from, on the data available here:
QKeras/STQ + per-layer JR models beat the MLPerf Tiny int8 baselines under
white-box attacks and, by a wide margin, under black-box attacks on the
deployed model, at a fraction of the flash; robust distillation gives a small
STQ student more robustness than training it alone at the same attack budget;
NEO-KD keeps every exit of a multi-exit network robust; and the quality
targets the recipes must reach. Each claim is checked with
`tinyrobust.bench.claims` on `benchmarks/results/<experiment>_<profile>/results`
(every seed there) and judged by the paired 95% bootstrap interval of its
difference (over seeds and, where results record them, test examples): it
holds when the interval clears the claim's margin, does not hold when it
lies on the other side, and is inconclusive when it straddles it. Each
profile's measured time (from the results' `wall_time_s`) is set against its
budget.

Writes benchmarks/results/paper_claims_<profile>.json and .md, and with
`--readme README.md` the README's Results section (between its
`<!-- results:begin -->` and `<!-- results:end -->` lines): the same tables
and sentences with each experiment's plots. Run:

    .venv/bin/python benchmarks/paper_claims.py --profile full --readme README.md
"""

import argparse
import json
import pathlib
import sys

from tinyrobust.bench import claims, results

RESULTS = pathlib.Path(__file__).parent / "results"
Claim = claims.Claim

# "A wide margin": ten points of accuracy; "a fraction of the flash": at most half the int8 file.
WIDE = 0.10
FRACTION = 0.5
# What the robustness costs: the robust model's clean accuracy against the baseline's. Clean accuracy is measured
# on the whole test split ("test_split"); the attacked examples are only its first few hundred.
CLEAN_COST = "STQ + JR keeps the int8 baseline's clean accuracy (within 2 points)"
# Each white-box claim is tested at every radius its experiment evaluates, so that none is left out of the README.
CLAIMS = {
    "fashion_mnist_tiny": [
        Claim("STQ + JR beats the int8 baseline under white-box attacks (worst case over FGSM, PGD and the "
              "AutoAttack-style suite)", "stq_jr", "int8", "worst", eps="0.02"),
        Claim("STQ + JR beats the int8 baseline under white-box attacks", "stq_jr", "int8", "worst", eps="0.05"),
        Claim("STQ + JR beats the int8 baseline under white-box attacks", "stq_jr", "int8", "worst", eps="0.1"),
        Claim("STQ + JR beats the int8 baseline by a wide margin (10 points) on the deployed file (transfer, "
              "Square, HopSkipJump on TFLite Micro)", "stq_jr", "int8", "deployed_worst", eps="0.1", margin=WIDE),
        Claim("STQ + JR ships in at most half the int8 baseline's flash", "stq_jr", "int8", "flash_bytes",
              max_ratio=FRACTION),
        Claim("STQ stays within 1.5 points of float clean accuracy", "stq", "float", "test_split", margin=-0.015),
        Claim(CLEAN_COST, "stq_jr", "int8", "test_split", margin=-0.02),
    ],
    "fashion_mnist_ard": [
        *(Claim("The ARD STQ student beats the same student adversarially trained alone", "stq_ard", "stq_fgsm_at",
                "worst", eps=eps) for eps in ("0.05", "0.1")),
        *(Claim("The RSLAD STQ student beats the same student adversarially trained alone", "stq_rslad",
                "stq_fgsm_at", "worst", eps=eps) for eps in ("0.05", "0.1")),
        *(Claim("The ARD STQ student beats the int8 baseline under white-box attacks", "stq_ard", "int8", "worst",
                eps=eps) for eps in ("0.05", "0.1")),
    ],
    "fashion_mnist_neokd": [
        Claim("NEO-KD keeps every exit robust: its weakest exit under the average and max-average multi-exit "
              "attacks beats that of the same multi-exit network adversarially trained without distillation",
              "stq_neokd", "stq_at", "weakest_exit", eps="0.05"),
        Claim("NEO-KD keeps every exit robust (weakest exit, average and max-average attacks)", "stq_neokd",
              "stq_at", "weakest_exit", eps="0.1"),
    ],
    "synthetic_kws_dscnn": [
        Claim("STQ + JR beats the int8 baseline under white-box attacks", "stq_jr", "int8", "worst", eps="0.1"),
        Claim("STQ + JR beats the int8 baseline under white-box attacks", "stq_jr", "int8", "worst", eps="0.25"),
        Claim("STQ + JR beats the int8 baseline under white-box attacks", "stq_jr", "int8", "worst", eps="0.5"),
        Claim("STQ + JR beats the int8 baseline by a wide margin (10 points) on the deployed file", "stq_jr", "int8",
              "deployed_worst", eps="0.5", margin=WIDE),
        Claim("STQ + JR ships in at most half the int8 baseline's flash", "stq_jr", "int8", "flash_bytes",
              max_ratio=FRACTION),
        Claim("STQ stays within 2 points of float clean accuracy", "stq", "float", "test_split", margin=-0.02),
        Claim(CLEAN_COST, "stq_jr", "int8", "test_split", margin=-0.02),
    ],
}
# Quality targets of the recipes: {experiment: [(model, least mean clean accuracy on the whole test split)]}.
TARGETS = {
    "fashion_mnist_tiny": [("float", 0.91), ("int8", 0.91)],
    "synthetic_kws_dscnn": [("float", 0.90)],
}
# Each full profile's time budget on 2 CPU cores (issue #19); other profiles have none.
BUDGET_HOURS = {"full": 2.5}
# The robust target of the recipes: the best adversarially trained or distilled STQ model on Fashion-MNIST (by
# mean worst case at eps 0.1) reaches these means (clean: the whole test split).
ROBUST_TARGET = {"experiments": ("fashion_mnist_tiny", "fashion_mnist_ard"), "eps": "0.1", "clean": 0.80,
                 "worst": 0.60}
NOT_TESTED = ("The same claims on CIFAR-10, SVHN and Speech Commands (`cifar10_resnet8`, `svhn_resnet8`, "
              "`speech_commands_dscnn`, `cifar10_ard_mobilenetv2`, `cifar10_neokd`): not run here (their data "
              "need a download and their full profiles a GPU).")


def _percent(value):
    """"91.2%", or "-" for a value not measured."""
    return "-" if value is None else f"{100 * value:.1f}%"


def _mean_test_accuracy(rows):
    """Mean accuracy on the whole test split over `rows`, or None when one of them does not record it."""
    values = [(r.get("test_accuracy") or {}).get("accuracy") for r in rows]
    return None if not values or None in values else sum(values) / len(values)


def _best_robust_stq(rows_by_experiment):
    """The robust target's record: the robust STQ model with the highest mean worst case at its eps, or None."""
    eps, best = ROBUST_TARGET["eps"], None
    for experiment in ROBUST_TARGET["experiments"]:
        groups = {}
        for r in rows_by_experiment.get(experiment, []):
            model = r["model"]
            robust = model.get("adversary") or (model.get("distill") or {}).get("method") in ("ard", "rslad")
            if model["quantization"] == "stq" and robust:
                groups.setdefault(model["name"], []).append(r)
        for name, group in groups.items():
            worst = [r["worst_case"].get(eps) for r in group]
            if None in worst:
                continue
            record = {"experiment": experiment, "model": name, "seeds": len(group), "eps": eps,
                      "clean": _mean_test_accuracy(group),
                      "worst": sum(worst) / len(worst)}
            if best is None or record["worst"] > best["worst"]:
                best = record
    if best is not None:
        best["met"] = (best["clean"] is not None and best["clean"] >= ROBUST_TARGET["clean"]
                       and best["worst"] >= ROBUST_TARGET["worst"])
    return best


def profile_seconds(rows):
    """A profile's measured time: every result's evaluation, and each model's training and export once per seed
    (the results of one model under several threat models share them).

    Args:
        rows: result records of one experiment and profile (every seed).

    Returns:
        Seconds, summed from the records' `wall_time_s`.
    """
    total, counted = 0.0, set()
    for r in rows:
        wall = r["wall_time_s"]
        total += wall["evaluate"]
        key = (r.get("seed"), r["model"]["name"])
        if key not in counted:
            counted.add(key)
            total += wall["train"] + wall["export"]
    return total


def time_split(rows):
    """Where a profile's time goes, per model: hours of training, evaluation, export and deployed evaluation,
    summed over seeds (training and export counted once per seed, as `profile_seconds` counts them).

    Returns:
        `{model: {"train", "evaluate", "export", "deployed"}}` in hours; `deployed` is None for a model whose
        records predate its own timing (their `export` then holds both).
    """
    split, counted = {}, set()
    for r in rows:
        wall, name = r["wall_time_s"], r["model"]["name"]
        hours = split.setdefault(name, {"train": 0.0, "evaluate": 0.0, "export": 0.0, "deployed": 0.0})
        hours["evaluate"] += (wall["evaluate"] or 0.0) / 3600
        if wall.get("deployed") is None:
            hours["deployed"] = None
        elif hours["deployed"] is not None:
            hours["deployed"] += wall["deployed"] / 3600
        if (r.get("seed"), name) not in counted:
            counted.add((r.get("seed"), name))
            hours["train"] += (wall["train"] or 0.0) / 3600
            hours["export"] += (wall["export"] or 0.0) / 3600
    return split


def hosts(rows):
    """The hosts that wrote a profile's results, with how many each wrote.

    Args:
        rows: result records.

    Returns:
        `{description: count}`, most results first; a record from before results named their host
        (`machine`) counts as "not recorded".
    """
    counts = {}
    for r in rows:
        m = r.get("machine")
        if not m:
            name = "not recorded"
        else:
            cpu = f"{m['cpu']} ({m['cpu_id']})" if m.get("cpu_id") else m["cpu"]
            name = f"{cpu}, {m['cores']} cores"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PLOTS = (("accuracy_vs_eps_linf_worst.png", "worst-case accuracy vs eps"),
         ("accuracy_vs_size_linf.png", "accuracy vs flash bytes of the shipped file"),
         ("accuracy_vs_arena_linf.png", "accuracy vs its TFLite Micro arena bytes"))


def write_readme_section(readme, markdown, profile, results_folder):
    """Replaces the README's Results block with `markdown` (headings one level down) and each experiment's plots.

    Raises:
        ValueError: the README lacks the begin/end marker lines.
    """
    readme = pathlib.Path(readme)
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"Expected one {BEGIN!r} line before one {END!r} line in the README. Received: readme={str(readme)!r}")
    body = ["#" + line if line.startswith("#") else line for line in markdown.splitlines()[1:]]
    root = readme.resolve().parent
    plots = []
    for experiment in CLAIMS:
        folder = pathlib.Path(results_folder).resolve() / f"{experiment}_{profile}" / "plots"
        found = [(folder / name, label) for name, label in PLOTS if (folder / name).is_file()]
        if found:
            plots.append(f"- {experiment}: " + ", ".join(
                f"[{label}]({path.relative_to(root) if path.is_relative_to(root) else path})" for path, label in found))
    if plots:
        body += ["", "### Plots", "", *plots]
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + "\n".join(body).strip("\n") + "\n" + text[stop:])


def _sentence(record, experiment):
    if record["verdict"] == "not measured":
        return f"- {record['statement']} ({experiment}): not measured (no paired results)."
    seeds = len(record["seeds"])
    what = claims.measured(record) + (" the baseline's bytes" if record["metric"] == "flash_bytes" else "")
    where = f" at eps {record['eps']}" if record["eps"] is not None else ""
    how = (f"(mean and 95% interval, resampling {record['resampled']})" if record["interval"] is not None
           else f"(no interval: {record['resampled']})")
    return (f"- {record['statement']}{where} ({experiment}, {record['better']} vs {record['baseline']}): "
            f"{record['verdict']} here, {what} {how} over {seeds} seed{'s' * (seeds > 1)} "
            f"({record['wins']} of {seeds} clear the margin).")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", help="results of which profile: <experiment>_<profile>/")
    parser.add_argument("--results", default=str(RESULTS), help="folder holding the <experiment>_<profile> folders")
    parser.add_argument("--readme", help="also rewrite this README's Results block (between its marker lines)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.results)
    checked, sentences, targets, rows_by_experiment = {}, [], [], {}
    for experiment, experiment_claims in CLAIMS.items():
        path = folder / f"{experiment}_{args.profile}" / "results"
        rows = rows_by_experiment[experiment] = results.read_all(path) if path.is_dir() else []
        checked[experiment] = [claims.check(claim, rows) for claim in experiment_claims]
        sentences += [_sentence(record, experiment) for record in checked[experiment]]
        for model, least in TARGETS.get(experiment, []):
            group = [r for r in rows if r["model"]["name"] == model]
            mean = _mean_test_accuracy(group)
            targets.append({"experiment": experiment, "model": model, "at_least": least, "mean": mean,
                            "seeds": len(group), "met": None if mean is None else mean >= least})
    robust = _best_robust_stq(rows_by_experiment)
    times = [{"experiment": experiment, "results": len(rows), "seeds": sorted({r.get("seed") for r in rows}),
              "hours": profile_seconds(rows) / 3600, "budget_hours": BUDGET_HOURS.get(args.profile),
              "hosts": hosts(rows), "split": time_split(rows)}
             for experiment, rows in rows_by_experiment.items() if rows]
    record = {"command": "benchmarks/paper_claims.py " + " ".join(argv), "profile": args.profile,
              "claims": checked, "quality_targets": targets, "time": times,
              "robust_target": {**ROBUST_TARGET, "experiments": list(ROBUST_TARGET["experiments"]), "best": robust},
              "not_tested": [NOT_TESTED]}
    out = pathlib.Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"paper_claims_{args.profile}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# The papers' claims on the offline runs (profile `{args.profile}`)", ""]
    for experiment, records in checked.items():
        lines += [f"## {experiment}", "", claims.table(records)]
    lines += ["## In words", "", *sentences, f"- {NOT_TESTED}", "", "## Quality targets (clean accuracy on the whole test split)", "",
              "| experiment | model | target | measured (mean) | seeds | met |", "| --- | --- | --- | --- | --- | --- |"]
    for t in targets:
        measured = _percent(t["mean"])
        lines.append(f"| {t['experiment']} | {t['model']} | {100 * t['at_least']:.0f}% | {measured} | {t['seeds']} | "
                     f"{'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
    goal = (f"at least {100 * ROBUST_TARGET['clean']:.0f}% clean (whole test split) and "
            f"{100 * ROBUST_TARGET['worst']:.0f}% worst case at eps {ROBUST_TARGET['eps']}")
    lines += ["", "## Robust target (the best adversarially trained or distilled STQ model on Fashion-MNIST)", ""]
    if robust is None:
        lines.append(f"Target {goal}: not measured (no robust STQ results).")
    else:
        lines.append(f"Target {goal}: {robust['model']} ({robust['experiment']}, {robust['seeds']} seed"
                     f"{'s' * (robust['seeds'] > 1)}) reaches {_percent(robust['clean'])} clean and "
                     f"{100 * robust['worst']:.1f}% worst case: {'met' if robust['met'] else 'not met'}.")
    lines += ["", "## Time on 2 CPU cores", "",
              "Summed from each result's `wall_time_s`: every evaluation, and each model's training and export once "
              "per seed (training time added up across interrupted and resumed runs). A run that shared the cores "
              "with another job counts its slower time, and 2-core hosts differ in speed (the README's demo timing "
              "gives a measured per-step ratio). Hosts: the results each one wrote.", "",
              "| experiment | results | seeds | hours | budget | within | hosts |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in times:
        budget = t["budget_hours"]
        within = "-" if budget is None else "yes" if t["hours"] <= budget else "no"
        lines.append(f"| {t['experiment']} | {t['results']} | {', '.join(map(str, t['seeds']))} | {t['hours']:.2f} | "
                     f"{'-' if budget is None else f'{budget} h'} | {within} | "
                     f"{'; '.join(f'{h}: {n}' for h, n in t['hosts'].items())} |")
    lines += ["", "Where the time goes (hours per model, summed over seeds; `-`: records from before the deployed "
              "evaluation was timed on its own, whose export column holds both):", "",
              "| experiment | model | train | evaluate | export | deployed |", "| --- | --- | --- | --- | --- | --- |"]
    for t in times:
        for model, hours in t["split"].items():
            deployed = "-" if hours["deployed"] is None else f"{hours['deployed']:.2f}"
            lines.append(f"| {t['experiment']} | {model} | {hours['train']:.2f} | {hours['evaluate']:.2f} | "
                         f"{hours['export']:.2f} | {deployed} |")
    lines += ["", f"Command: `{record['command']}`"]
    (out / f"paper_claims_{args.profile}.md").write_text("\n".join(lines) + "\n")
    if args.readme:
        write_readme_section(args.readme, "\n".join(lines), args.profile, folder)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
