"""Claims tested on result rows: one model against another, paired by seed.

A `Claim` says that one model of an experiment does better than another on
one metric (clean accuracy on the whole test split or on the attacked
examples, worst-case robust accuracy at an eps, the
deployed model's worst case, flash bytes of the shipped file, or the
accuracy of a multi-exit network's weakest exit under the stronger, per
exit, of the average and max-average multi-exit attacks). `check` pairs
the two models' results seed by seed, and reports each seed's difference,
their mean and standard deviation, and a verdict that holds only when every
seed agrees: a claim measured on one seed out of three that happened to go
the right way is reported as such.
"""

import dataclasses
import math

__all__ = ["METRICS", "Claim", "check", "measured", "table"]

METRICS = ("test_split", "clean", "worst", "deployed_clean", "deployed_worst", "flash_bytes", "weakest_exit")
_NEEDS_EPS = ("worst", "deployed_worst", "weakest_exit")


def _value(result, metric, eps):
    """The metric of one result row, or None when the row does not record it."""
    deployed = result.get("deployed") or {}
    if metric == "test_split":  # the whole test split; None in records from before it
        return (result.get("test_accuracy") or {}).get("accuracy")
    if metric == "clean":  # the attacked examples
        return result["clean_accuracy"]
    if metric == "worst":
        return result["worst_case"].get(eps)
    if metric == "deployed_clean":
        return deployed.get("clean_accuracy")
    if metric == "deployed_worst":
        return (deployed.get("worst_case") or {}).get(eps)
    if metric == "weakest_exit":  # the lowest exit accuracy left by any multi-exit PGD run (average, max-average)
        attacks = ((result.get("multi_exit") or {}).get("attacks") or {}).values()
        exits = [accuracy for by_eps in attacks for accuracy in (by_eps.get(eps) or [])]
        return min(exits) if exits else None
    return deployed.get("model_bytes")


@dataclasses.dataclass(frozen=True)
class Claim:
    """`better` beats `baseline` on `metric` in experiment results of one threat model.

    Accuracy metrics compare by difference (`better - baseline`, in
    accuracy units), which must exceed `margin`; `flash_bytes` compares by the
    ratio `better / baseline`, which must stay below `max_ratio`.

    Args:
        statement: the claim in words, as the README states it.
        better: the model that should come out ahead.
        baseline: the model it is measured against.
        metric: one of `METRICS`.
        eps: the radius (as written in the results, e.g. "0.1") for the
            worst-case metrics; None otherwise.
        norm: the threat model's norm.
        margin: least difference that counts as a win (accuracy metrics).
        max_ratio: largest ratio that counts as a win (`flash_bytes`).
    """

    statement: str
    better: str
    baseline: str
    metric: str
    eps: str = None
    norm: str = "linf"
    margin: float = 0.0
    max_ratio: float = 1.0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"Expected `metric` to be one of {', '.join(METRICS)}. Received: metric={self.metric!r}")
        if (self.eps is None) == (self.metric in _NEEDS_EPS):
            raise ValueError(f"`eps` is required by (and only by) the metrics {', '.join(_NEEDS_EPS)}. "
                             f"Received: metric={self.metric!r}, eps={self.eps!r}")
        if self.better == self.baseline:
            raise ValueError(f"A claim compares two different models. Received: better={self.better!r}, "
                             f"baseline={self.baseline!r}")


def _by_seed(results, model, norm):
    return {r["seed"]: r for r in results if r["model"]["name"] == model and r["threat_model"]["norm"] == norm}


def check(claim, results):
    """Measures `claim` on `results` (result dicts of one experiment, any number of seeds).

    Returns:
        A dict: the claim's fields, `seeds` (those where both models have a
        result recording the metric), per-seed `better_values`,
        `baseline_values` and `differences` (ratios for `flash_bytes`), their
        `mean` and `std` (sample standard deviation; 0 for one seed), and
        `verdict`: "holds" (every seed wins), "does not hold" (none does),
        "mixed" or "not measured".
    """
    better, baseline = _by_seed(results, claim.better, claim.norm), _by_seed(results, claim.baseline, claim.norm)
    seeds, values_b, values_a = [], [], []
    for seed in sorted(set(better) & set(baseline)):
        vb, va = _value(better[seed], claim.metric, claim.eps), _value(baseline[seed], claim.metric, claim.eps)
        if vb is not None and va is not None:
            seeds.append(seed)
            values_b.append(vb)
            values_a.append(va)
    ratio = claim.metric == "flash_bytes"
    differences = [b / a if ratio else b - a for b, a in zip(values_b, values_a)]
    wins = [d < claim.max_ratio if ratio else d > claim.margin for d in differences]
    mean = sum(differences) / len(differences) if differences else None
    std = (math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))
           if len(differences) > 1 else 0.0 if differences else None)
    verdict = ("not measured" if not wins else "holds" if all(wins) else "does not hold" if not any(wins)
               else "mixed")
    return {**dataclasses.asdict(claim), "seeds": seeds, "better_values": values_b, "baseline_values": values_a,
            "differences": differences, "mean": mean, "std": std, "wins": sum(wins), "verdict": verdict}


def measured(record):
    """The measured difference of a checked claim in words: "+4.2 ± 1.1 points", or "0.47x" for flash bytes;
    "-" when not measured."""
    if record["mean"] is None:
        return "-"
    if record["metric"] == "flash_bytes":
        return f"{record['mean']:.2f}x" + (f" ± {record['std']:.2f}" if len(record["seeds"]) > 1 else "")
    spread = f" ± {100 * record['std']:.1f}" if len(record["seeds"]) > 1 else ""
    return f"{100 * record['mean']:+.1f}{spread} points"


def _side(values, metric):
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean / 1024:.1f} KB" if metric == "flash_bytes" else f"{100 * mean:.1f}%"


def table(records):
    """Markdown table of checked claims: the rows compared, the measured difference with its spread over
    seeds, and the verdict with the number of seeds that agree."""
    lines = ["| claim | rows compared | metric | better / baseline (mean) | measured | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        metric = r["metric"] + (f" eps {r['eps']}" if r["eps"] is not None else "")
        verdict = r["verdict"] if r["verdict"] == "not measured" else f"{r['verdict']} ({r['wins']} of {len(r['seeds'])} seeds)"
        lines.append(f"| {r['statement']} | {r['better']} vs {r['baseline']} | {metric} | "
                     f"{_side(r['better_values'], r['metric'])} / {_side(r['baseline_values'], r['metric'])} | "
                     f"{measured(r)} | {verdict} |")
    return "\n".join(lines) + "\n"
