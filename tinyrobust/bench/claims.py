"""Claims tested on result rows: one model against another, paired by seed and by example.

A `Claim` says that one model of an experiment does better than another on
one metric (clean accuracy on the whole test split or on the attacked
examples, worst-case robust accuracy at an eps, the
deployed model's worst case, flash bytes of the shipped file, or the
accuracy of a multi-exit network's weakest exit under the stronger, per
exit, of the average and max-average multi-exit attacks). `check` pairs
the two models' results seed by seed and, where the results keep which
examples each model got right (`per_example`), example by example, and
judges the claim by a 95% confidence interval of the difference:

- the interval is a hierarchical paired bootstrap: resample the seeds and
  the examples (the same examples for both models and, as every seed is
  measured on the same test examples, for every seed), and take the mean
  difference; 10,000 resamples, percentile interval. It
  covers both sources of error a claim has, the training seed and the
  finite example set. Results without per-example records (before they
  existed), and metrics that have none (flash bytes, the weakest exit),
  resample the seeds only: with three seeds that interval is little more
  than their range, and an accuracy claim with one such seed has none (it is
  inconclusive);
- the verdict: "holds" when the whole interval clears the claim's margin
  (above it; below `max_ratio` for flash bytes), "does not hold" when the
  whole interval is on the wrong side, "inconclusive" when it straddles,
  "not measured" without paired results.

The per-seed differences, their mean and spread and how many seeds win
are reported beside it, but decide nothing.
"""

import dataclasses
import math

import numpy as np

from tinyrobust.bench import per_example

__all__ = ["METRICS", "Claim", "bootstrap_interval", "check", "measured", "table"]

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


def _correct(result, metric, eps):
    """The per-example correctness behind a metric of one result row, or None when it is not recorded."""
    if metric in ("test_split", "clean", "worst"):
        record = result.get("per_example")
    elif metric in ("deployed_clean", "deployed_worst"):
        record = (result.get("deployed") or {}).get("per_example")
    else:
        return None
    if not record:
        return None
    packed = {"test_split": record.get("test_split"), "clean": record.get("clean"),
              "deployed_clean": record.get("clean")}.get(metric)
    if metric in ("worst", "deployed_worst"):
        packed = (record.get("worst_case") or {}).get(eps)
    return None if packed is None else per_example.unpack(packed)


def bootstrap_interval(per_seed, confidence=0.95, resamples=10_000, seed=0):
    """A hierarchical paired bootstrap interval of a mean difference.

    Each resample draws the seeds with replacement and the examples with
    replacement; the examples are drawn once per resample for every seed,
    since every seed of a result set is measured on the same test examples
    (drawing them per seed would count that one sample several times and
    narrow the interval).

    Args:
        per_seed: one array per seed of per-example differences (better minus baseline, e.g. -1, 0 or 1 for
            correctness), all over the same examples; or one value per seed (arrays of length 1) for a
            seed-level difference.
        confidence: the interval's coverage.
        resamples: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        `(low, high)`: the percentile interval of the mean over the drawn seeds of the mean over the drawn
        examples.

    Raises:
        ValueError: no seeds, an empty array, or arrays of different lengths.
    """
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(d, dtype=np.float64).reshape(-1) for d in per_seed]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError(f"Expected a non-empty array of differences per seed. Received: {len(arrays)} seeds")
    if len({a.size for a in arrays}) != 1:
        raise ValueError("Expected every seed's differences over the same examples. Received: lengths "
                         f"{[a.size for a in arrays]}")
    table = np.stack(arrays)  # (seeds, examples)
    chosen = rng.integers(0, len(arrays), size=(resamples, len(arrays)))
    if table.shape[1] == 1:
        means = table[chosen, 0].mean(axis=1)
    else:
        per_seed_means = np.empty((len(arrays), resamples))
        for start in range(0, resamples, 1000):  # examples drawn once per resample, shared by the seeds
            stop = min(start + 1000, resamples)
            draws = rng.integers(0, table.shape[1], size=(stop - start, table.shape[1]), dtype=np.int32)
            per_seed_means[:, start:stop] = table[:, draws].mean(axis=2)
        means = per_seed_means[chosen, np.arange(resamples)[:, None]].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _by_seed(results, model, norm):
    return {r["seed"]: r for r in results if r["model"]["name"] == model and r["threat_model"]["norm"] == norm}


def check(claim, results):
    """Measures `claim` on `results` (result dicts of one experiment, any number of seeds).

    Returns:
        A dict: the claim's fields, `seeds` (those where both models have a
        result recording the metric), per-seed `better_values`,
        `baseline_values` and `differences` (ratios for `flash_bytes`), their
        `mean` and `std` (sample standard deviation; 0 for one seed), `wins`
        (seeds that clear the margin), `interval` (the 95% bootstrap interval
        of the difference, see the module's docstring), `resampled`
        ("seeds and examples" or "seeds") and `verdict`: "holds",
        "does not hold", "inconclusive" or "not measured".
    """
    better, baseline = _by_seed(results, claim.better, claim.norm), _by_seed(results, claim.baseline, claim.norm)
    seeds, values_b, values_a, paired = [], [], [], []
    for seed in sorted(set(better) & set(baseline)):
        vb, va = _value(better[seed], claim.metric, claim.eps), _value(baseline[seed], claim.metric, claim.eps)
        if vb is not None and va is not None:
            seeds.append(seed)
            values_b.append(vb)
            values_a.append(va)
            cb = _correct(better[seed], claim.metric, claim.eps)
            ca = _correct(baseline[seed], claim.metric, claim.eps)
            paired.append(cb.astype(float) - ca if cb is not None and ca is not None and cb.size == ca.size
                          else None)
    if len({p.size for p in paired if p is not None}) > 1:  # seeds measured on different example sets
        paired = [None] * len(paired)
    ratio = claim.metric == "flash_bytes"
    differences = [b / a if ratio else b - a for b, a in zip(values_b, values_a)]
    wins = [d < claim.max_ratio if ratio else d > claim.margin for d in differences]
    mean = sum(differences) / len(differences) if differences else None
    std = (math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))
           if len(differences) > 1 else 0.0 if differences else None)
    interval, resampled, verdict = None, None, "not measured"
    by_example = bool(paired) and all(p is not None for p in paired)
    if differences and not by_example and len(differences) == 1 and not ratio:
        resampled, verdict = "one seed, no per-example records", "inconclusive"  # no interval can be had
    elif differences:
        resampled = "seeds and examples" if by_example else "seeds"
        interval = bootstrap_interval(paired if by_example else [[d] for d in differences])
        low, high = interval
        if ratio:
            verdict = "holds" if high < claim.max_ratio else "does not hold" if low > claim.max_ratio else "inconclusive"
        else:
            verdict = "holds" if low > claim.margin else "does not hold" if high < claim.margin else "inconclusive"
    return {**dataclasses.asdict(claim), "seeds": seeds, "better_values": values_b, "baseline_values": values_a,
            "differences": differences, "mean": mean, "std": std, "wins": sum(wins), "interval": interval,
            "resampled": resampled, "verdict": verdict}


def measured(record):
    """The measured difference of a checked claim in words: "+4.2 points [+1.0, +7.5]" (the mean over seeds and
    its 95% interval), or "0.47x [0.47, 0.47]" for flash bytes; "-" when not measured."""
    if record["mean"] is None:
        return "-"
    low, high = record.get("interval") or (None, None)
    if record["metric"] == "flash_bytes":
        return f"{record['mean']:.2f}x" + ("" if low is None else f" [{low:.2f}, {high:.2f}]")
    return f"{100 * record['mean']:+.1f} points" + ("" if low is None else f" [{100 * low:+.1f}, {100 * high:+.1f}]")


def _side(values, metric):
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean / 1024:.1f} KB" if metric == "flash_bytes" else f"{100 * mean:.1f}%"


def table(records):
    """Markdown table of checked claims: the rows compared, the mean difference with its 95% interval and what
    the interval resampled, the seeds that clear the margin, and the verdict."""
    lines = ["| claim | rows compared | metric | better / baseline (mean) | difference [95% interval] | "
             "resampled | seeds that win | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        metric = r["metric"] + (f" eps {r['eps']}" if r["eps"] is not None else "")
        wins = "-" if r["verdict"] == "not measured" else f"{r['wins']} of {len(r['seeds'])}"
        lines.append(f"| {r['statement']} | {r['better']} vs {r['baseline']} | {metric} | "
                     f"{_side(r['better_values'], r['metric'])} / {_side(r['baseline_values'], r['metric'])} | "
                     f"{measured(r)} | {r.get('resampled') or '-'} | {wins} | {r['verdict']} |")
    return "\n".join(lines) + "\n"
