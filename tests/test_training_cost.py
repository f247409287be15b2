import re

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("training_cost")


def test_every_method_names_its_adversary_or_jacobian(script):
    assert script.method_settings("pgd10", 0.1) == ({"method": "pgd", "steps": 10, "epsilon": 0.1}, None, 0.1)
    assert script.method_settings("n_fgsm@0.2", 0.1) == ({"method": "n_fgsm", "epsilon": 0.2}, None, 0.2)
    adversary, jacobian, _ = script.method_settings("jr_quarter", 0.1)
    assert adversary is None and jacobian["batch_fraction"] == 0.25 and jacobian["layers"] == script.JR_WEIGHTS
    with pytest.raises(ValueError, match="Received: method='pgd10@0.2'"):  # only one-step methods take a radius
        script.method_settings("pgd10@0.2", 0.1)


def test_the_summary_is_the_mean_and_spread_over_seeds_with_collapses_counted(script):
    def run(method, seed, cpu, clean, worst, collapsed=False):
        return {"method": method, "seed": seed, "epsilon": 0.1, "train_cpu_s": cpu, "clean_validation": clean,
                "worst_validation": worst, "collapsed": collapsed, "robust_validation": {"fgsm": worst + 0.1},
                "pgd10_check_per_epoch": [0.2, 0.5, worst]}

    rows = {r["method"]: r for r in script.summarise([
        run("none", 0, 10.0, 0.9, 0.0), run("none", 1, 12.0, 0.9, 0.0),
        run("fgsm_rs", 0, 20.0, 0.7, 0.4), run("fgsm_rs", 1, 24.0, 0.6, 0.1, collapsed=True)])}
    assert rows["fgsm_rs"]["cost_vs_plain"] == pytest.approx(2.0)
    assert rows["fgsm_rs"]["worst_validation"][0] == pytest.approx(0.25) and rows["fgsm_rs"]["collapsed"] == 1
    assert rows["none"]["seeds"] == [0, 1]
    assert rows["fgsm_rs"]["check_first_best_last"] == pytest.approx([0.2, 0.5, 0.25])


@pytest.mark.parametrize("argv, message", [
    (["--epsilon", "8"], "--epsilon must be in \\(0, 1\\]"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--methods", "free"], "Unknown method"),
])
def test_bad_arguments_stop_before_any_training(script, capsys, argv, message):
    with pytest.raises(SystemExit):
        script.parse(argv)
    assert re.search(message, capsys.readouterr().err)
