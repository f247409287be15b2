import pathlib

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from tinyrobust.bench import claims

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _row(model, seed, clean, worst, deployed_worst=None, model_bytes=None, norm="linf"):
    deployed = None if model_bytes is None else {"clean_accuracy": clean, "worst_case": {"0.1": deployed_worst},
                                                 "model_bytes": model_bytes}
    return {"model": {"name": model}, "seed": seed, "threat_model": {"norm": norm}, "clean_accuracy": clean,
            "worst_case": {"0.1": worst}, "deployed": deployed}


ROWS = [
    _row("int8", 0, 0.90, 0.10, 0.20, 30000), _row("stq_jr", 0, 0.85, 0.40, 0.60, 10000),
    _row("int8", 1, 0.91, 0.12, 0.22, 30000), _row("stq_jr", 1, 0.84, 0.30, 0.50, 10000),
    _row("int8", 2, 0.90, 0.20, 0.25, 30000), _row("stq_jr", 2, 0.86, 0.15, 0.55, 10000),
    _row("stq_jr", 3, 0.86, 0.99),  # no baseline for this seed: not paired
]


def test_a_claim_pairs_seeds_and_is_judged_by_its_interval():
    record = claims.check(claims.Claim("JR beats int8 white-box", "stq_jr", "int8", "worst", eps="0.1"), ROWS)
    assert record["seeds"] == [0, 1, 2]
    assert record["differences"] == pytest.approx([0.30, 0.18, -0.05])
    assert record["mean"] == pytest.approx(0.43 / 3)
    assert record["std"] == pytest.approx(0.1778576, abs=1e-6)
    assert record["wins"] == 2 and record["resampled"] == "seeds"  # no per-example records: seeds only
    low, high = record["interval"]
    assert low < 0 < high and record["verdict"] == "inconclusive"  # one seed against: the interval straddles 0
    deployed = claims.check(claims.Claim("wide margin on the device", "stq_jr", "int8", "deployed_worst", eps="0.1",
                                         margin=0.25), ROWS)
    assert deployed["verdict"] == "holds" and deployed["differences"] == pytest.approx([0.4, 0.28, 0.3])
    assert deployed["interval"][0] == pytest.approx(0.28) and deployed["interval"][1] == pytest.approx(0.4)
    clean = claims.check(claims.Claim("clean", "stq_jr", "int8", "clean"), ROWS)
    assert clean["verdict"] == "does not hold"
    flash = claims.check(claims.Claim("a fraction of the flash", "stq_jr", "int8", "flash_bytes", max_ratio=0.5), ROWS)
    assert flash["verdict"] == "holds" and flash["mean"] == pytest.approx(1 / 3)
    missing = claims.check(claims.Claim("no such model", "stq_jr", "float", "clean"), ROWS)
    assert missing["verdict"] == "not measured" and missing["mean"] is None and missing["interval"] is None
    # Clean accuracy on the whole test split: only rows that record it are paired.
    rows = [{**r, "test_accuracy": {"accuracy": r["clean_accuracy"] - 0.01 * r["seed"], "examples": 10000}}
            for r in ROWS if r["seed"] < 2] + [r for r in ROWS if r["seed"] >= 2]
    split = claims.check(claims.Claim("split", "stq_jr", "int8", "test_split", margin=-0.06), rows)
    assert split["seeds"] == [0, 1] and split["differences"] == pytest.approx([-0.05, -0.07])
    assert split["verdict"] == "inconclusive" and claims.measured(split) == "-6.0 points [-7.0, -5.0]"
    table = claims.table([record, deployed, flash, missing])
    assert ("| JR beats int8 white-box | stq_jr vs int8 | worst eps 0.1 | 28.3% / 14.0% | +14.3 points "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] | seeds | 2 of 3 | inconclusive |") in table
    assert "0.33x [0.33, 0.33]" in table and "| not measured |" in table


def _paired_rows(seeds, n, better_correct, baseline_correct):
    """Rows whose per-example records say which of `n` examples each model got right (the same every seed)."""
    from tinyrobust.bench import per_example

    rows = []
    for seed in seeds:
        for model, correct in (("stq_jr", better_correct), ("int8", baseline_correct)):
            rows.append({"model": {"name": model}, "seed": seed, "threat_model": {"norm": "linf"},
                         "clean_accuracy": 1.0, "worst_case": {"0.1": float(np.mean(correct))}, "deployed": None,
                         "per_example": {"clean": per_example.pack(np.ones(n, bool)),
                                         "worst_case": {"0.1": per_example.pack(correct)}}})
    return rows


def test_the_interval_resamples_examples_when_results_record_them():
    """1,000 paired examples, the better model right on 100 the baseline gets wrong and alike elsewhere: the
    difference is 0.1 with a standard error of sqrt(0.09 / 1000) = 0.0095, so the 95% interval is close to
    0.1 +- 1.96 * 0.0095 (three identical seeds add no seed-to-seed spread)."""
    n = 1000
    baseline = np.zeros(n, bool)
    baseline[:500] = True
    better = baseline.copy()
    better[500:600] = True
    record = claims.check(claims.Claim("JR wins", "stq_jr", "int8", "worst", eps="0.1"),
                          _paired_rows([0, 1, 2], n, better, baseline))
    assert record["resampled"] == "seeds and examples" and record["mean"] == pytest.approx(0.1)
    low, high = record["interval"]
    half = 1.96 * np.sqrt(0.09 / n)
    assert low == pytest.approx(0.1 - half, abs=0.003) and high == pytest.approx(0.1 + half, abs=0.003)
    assert record["verdict"] == "holds"
    assert claims.check(claims.Claim("by 15 points", "stq_jr", "int8", "worst", eps="0.1", margin=0.15),
                        _paired_rows([0, 1, 2], n, better, baseline))["verdict"] == "does not hold"
    assert claims.check(claims.Claim("by 10 points", "stq_jr", "int8", "worst", eps="0.1", margin=0.1),
                        _paired_rows([0, 1, 2], n, better, baseline))["verdict"] == "inconclusive"
    # A sample too small to separate a 2-point difference: 50 examples.
    small = claims.check(claims.Claim("JR wins", "stq_jr", "int8", "worst", eps="0.1"),
                         _paired_rows([0, 1, 2], 50, better[450:500] | (np.arange(50) == 0), better[450:500]))
    assert small["verdict"] == "inconclusive"


def test_bootstrap_interval_is_reproducible_and_refuses_empty_seeds():
    assert claims.bootstrap_interval([[0.1], [0.2]]) == claims.bootstrap_interval([[0.1], [0.2]])
    with pytest.raises(ValueError, match="per seed"):
        claims.bootstrap_interval([[]])
    with pytest.raises(ValueError, match="the same examples"):
        claims.bootstrap_interval([[0, 1], [1]])


def test_the_weakest_exit_of_a_multi_exit_network_under_either_multi_exit_attack():
    def row(model, seed, max_average, average=(0.9, 0.9, 0.9)):
        return {"model": {"name": model}, "seed": seed, "threat_model": {"norm": "linf"}, "clean_accuracy": 0.8,
                "worst_case": {"0.1": 0.3}, "deployed": None,
                "multi_exit": {"attacks": {"average": {"0.1": list(average), "0.05": [0.1, 0.1, 0.1]},
                                           "max_average": {"0.1": max_average}}}}

    # The average attack is the stronger one on seed 1's first exit of "neokd" (0.28 < 0.30); other radii
    # (0.05) do not count.
    rows = [row("neokd", 0, [0.40, 0.35, 0.45]), row("at", 0, [0.50, 0.20, 0.40]),
            row("neokd", 1, [0.30, 0.33, 0.31], average=(0.28, 0.9, 0.9)), row("at", 1, [0.25, 0.35, 0.30]),
            row("plain", 0, None)]
    record = claims.check(claims.Claim("every exit robust", "neokd", "at", "weakest_exit", eps="0.1"), rows)
    assert record["better_values"] == [0.35, 0.28] and record["baseline_values"] == [0.20, 0.25]
    assert record["verdict"] == "holds" and record["mean"] == pytest.approx(0.09)
    rows[-1]["multi_exit"] = None  # a single-exit model records no exits: not measured
    assert claims.check(claims.Claim("s", "plain", "at", "weakest_exit", eps="0.1"), rows)["verdict"] == "not measured"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(metric="robust"), "Received: metric='robust'"),
        (dict(metric="worst"), "Received: metric='worst', eps=None"),
        (dict(metric="weakest_exit"), "Received: metric='weakest_exit', eps=None"),
        (dict(metric="clean", eps="0.1"), "Received: metric='clean', eps='0.1'"),
        (dict(metric="clean", baseline="a"), "Received: better='a', baseline='a'"),
    ],
)
def test_bad_claims_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        claims.Claim(**{"statement": "s", "better": "a", "baseline": "b", **kwargs})


def test_the_paper_claims_script_reads_every_seed_of_the_committed_layout(tmp_path):
    import json
    import shutil

    script = load_benchmark("paper_claims")
    for experiment in ("synthetic_kws_dscnn_quick", "fashion_mnist_ard_quick"):
        shutil.copytree(ROOT / "benchmarks/results" / experiment, tmp_path / experiment)
    for path in (tmp_path / "synthetic_kws_dscnn_quick/results").glob("float__*.json"):  # the whole test split
        path.write_text(json.dumps({**json.loads(path.read_text()), "test_accuracy": {"accuracy": 0.875,
                                                                                     "examples": 2400}}))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\n<!-- results:begin -->\nstale text\n<!-- results:end -->\n\n## Next\n")
    script.main(["--profile", "quick", "--results", str(tmp_path), "--readme", str(readme)])
    record = json.loads((tmp_path / "paper_claims_quick.json").read_text())
    rows = {r["model"]["name"]: r for r in (json.loads(p.read_text()) for p in
                                            (tmp_path / "synthetic_kws_dscnn_quick/results").glob("*.json"))}
    (flash,) = [c for c in record["claims"]["synthetic_kws_dscnn"] if c["metric"] == "flash_bytes"]
    ratio = rows["stq_jr"]["deployed"]["model_bytes"] / rows["int8"]["deployed"]["model_bytes"]
    assert flash["mean"] == pytest.approx(ratio) and flash["verdict"] == ("holds" if ratio < 0.5 else "does not hold")
    assert all(c["verdict"] == "not measured" for c in record["claims"]["fashion_mnist_tiny"])
    # The robust target: the robust STQ model with the best worst case at eps 0.1 (KD, not robust, is left out).
    ard = {r["model"]["name"]: r for r in (json.loads(p.read_text()) for p in
                                           (tmp_path / "fashion_mnist_ard_quick/results").glob("*.json"))}
    best = max(("stq_fgsm_at", "stq_ard", "stq_rslad"), key=lambda n: ard[n]["worst_case"]["0.1"])
    assert record["robust_target"]["best"]["model"] == best and "stq_kd" in ard
    assert record["robust_target"]["best"]["worst"] == ard[best]["worst_case"]["0.1"]
    assert record["robust_target"]["best"]["met"] is False
    assert record["robust_target"]["best"]["clean"] is None  # these records do not hold the whole test split
    (kws_float,) = [t for t in record["quality_targets"] if t["experiment"] == "synthetic_kws_dscnn"]
    assert kws_float["mean"] == 0.875 and kws_float["seeds"] == 1 and kws_float["met"] is False
    assert "| synthetic_kws_dscnn | float | 90% | 87.5% | 1 | no |" in (tmp_path / "paper_claims_quick.md").read_text()
    assert "## In words" in (tmp_path / "paper_claims_quick.md").read_text()
    # The time: each model's training and export once per seed, every evaluation.
    (kws_time,) = [t for t in record["time"] if t["experiment"] == "synthetic_kws_dscnn"]
    seconds = sum(sum(r["wall_time_s"].values()) for r in rows.values())
    assert kws_time["hours"] == pytest.approx(seconds / 3600) and kws_time["results"] == len(rows)
    assert kws_time["budget_hours"] is None  # only the full profiles have a budget
    assert {t["experiment"] for t in record["time"]} == {"synthetic_kws_dscnn", "fashion_mnist_ard"}
    assert kws_time["hosts"] == {"not recorded": len(rows)}  # these records are from before `machine`
    host = {"cpu": "AMD EPYC", "cpu_id": "family 25 model 1 stepping 1", "isa": ["avx2"], "cores": 2, "system": "L"}
    named = [{**r, "machine": host} for r in list(rows.values())[:2]] + list(rows.values())[2:]
    assert script.hosts(named) == {"not recorded": len(rows) - 2,
                                   "AMD EPYC (family 25 model 1 stepping 1), 2 cores": 2}
    assert script.hosts([{"machine": {**host, "cpu_id": None}}]) == {"AMD EPYC, 2 cores": 1}
    twice = [{**r, "threat_model": {"norm": "l2"}} for r in rows.values()] + list(rows.values())
    evaluations = sum(r["wall_time_s"]["evaluate"] for r in rows.values())
    assert script.profile_seconds(twice) == pytest.approx(seconds + evaluations)
    # The README's Results block: the same text one heading level down, the plots linked, the rest untouched.
    text = readme.read_text()
    assert "stale text" not in text and "### In words" in text and text.endswith("<!-- results:end -->\n\n## Next\n")
    assert "[worst-case accuracy vs eps](synthetic_kws_dscnn_quick/plots/accuracy_vs_eps_linf_worst.png)" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        script.main(["--profile", "quick", "--results", str(tmp_path), "--readme", str(readme)])


def test_the_paper_claims_cover_every_radius_of_each_full_profile():
    # No radius left out of the README: each white-box claim is tested at every eps its experiment evaluates.
    from tinyrobust.bench import config

    script = load_benchmark("paper_claims")
    for experiment, listed in script.CLAIMS.items():
        epsilons = config.load(ROOT / "experiments" / f"{experiment}.toml", profile="full").threat_models["linf"].epsilons
        radii = {}
        for claim in listed:
            if claim.metric in ("worst", "weakest_exit"):
                radii.setdefault((claim.better, claim.baseline, claim.metric), set()).add(claim.eps)
        assert radii, experiment
        for key, found in radii.items():
            assert found == {str(eps) for eps in epsilons}, (experiment, key)


def test_the_time_of_a_profile_splits_into_its_stages_per_model():
    script = load_benchmark("paper_claims")

    def row(model, seed, norm, deployed):
        return {"model": {"name": model}, "seed": seed, "threat_model": {"norm": norm},
                "wall_time_s": {"train": 3600.0, "evaluate": 1800.0, "export": 360.0, "deployed": deployed}}

    rows = [row("a", 0, "linf", 720.0), row("a", 0, "l2", 720.0), row("a", 1, "linf", 720.0),
            row("old", 0, "linf", None)]
    split = script.time_split(rows)
    # Training and export once per seed; evaluation and the deployed evaluation once per threat model.
    assert split["a"] == pytest.approx({"train": 2.0, "evaluate": 1.5, "export": 0.2, "deployed": 0.6})
    assert split["old"]["deployed"] is None and split["old"]["export"] == pytest.approx(0.1)
