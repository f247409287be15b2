import json

import pytest

from tinyrobust import cli, data
from tinyrobust.bench import ExperimentError, config, sweep

from experiment_files import write as _write  # noqa: E402
from experiment_files import BASE as _BASE  # noqa: E402

BASE = _BASE.replace('options = { width = 4 }', 'options = { width = 4 }\njacobian = { input = 0.01 }') + """
[train]
epochs = 1
limit = 64
[export]
enabled = false
"""


SWEEP = """
[[sweeps]]
model = "m"
select = "robust_with_clean"
epsilon = 0.05
min_clean = 0.0
examples = 16
steps = 1
grid = { "jacobian.input" = [0.0, 0.5], "train.epochs" = [1] }
"""


def test_a_sweep_trains_every_candidate_and_selects_on_validation_data_only(tmp_path, monkeypatch):
    path = _write(tmp_path, BASE + SWEEP)
    (built,) = config.load_sweeps(path)
    assert [settings for settings, _ in built.candidates] == [{"jacobian.input": 0.0, "train.epochs": 1},
                                                             {"jacobian.input": 0.5, "train.epochs": 1}]
    assert [e.models[-1].name for _, e in built.candidates] == ["m__1", "m__2"]
    assert built.candidates[1][1].models[-1].jacobian == {"input": 0.5}
    real = data.load_arrays, data.load

    def no_test(loader):
        def guarded(name, split, *args, **kwargs):
            if split == "test":
                raise AssertionError("a sweep read the test split")
            return loader(name, split, *args, **kwargs)
        return guarded

    monkeypatch.setattr(data, "load_arrays", no_test(real[0]))
    monkeypatch.setattr(data, "load", no_test(real[1]))
    record = sweep.run(built, tmp_path / "run", verbose=False)
    assert record["split"] == "validation" and len(record["candidates"]) == 2
    best = max(record["candidates"], key=lambda r: (r["robust"], -r["candidate"]))
    assert record["chosen"] == best["candidate"] and record["chosen_settings"] == best["settings"]
    assert all(0 <= r["clean"] <= 1 and 0 <= r["robust"] <= 1 for r in record["candidates"])
    written = json.loads((tmp_path / "run" / "sweeps" / "m.json").read_text())
    assert written["chosen"] == record["chosen"] and "| candidate |" in (tmp_path / "run/sweeps/m.md").read_text()
    # Resumed: the trained candidates are reused, the same choice comes out.
    assert sweep.run(built, tmp_path / "run", verbose=False)["chosen"] == record["chosen"]


def test_selection_rules():
    rows = [{"clean": 0.90, "robust": 0.20}, {"clean": 0.70, "robust": 0.50}, {"clean": 0.80, "robust": 0.40},
            {"clean": 0.80, "robust": 0.40}]
    assert sweep.select(rows, "clean")[0] == 0
    assert sweep.select(rows, "robust")[0] == 1
    assert sweep.select(rows, "robust_with_clean", 0.75)[0] == 2  # the earlier of a tie
    index, reason = sweep.select(rows, "robust_with_clean", 0.95)
    assert index == 0 and "no candidate reached" in reason


@pytest.mark.parametrize("text, message", [
    (SWEEP.replace('model = "m"', 'model = "x"'), "sweeps\\[0\\].model='x'"),
    (SWEEP.replace('"robust_with_clean"', '"best"'), "sweeps\\[0\\].select='best'"),
    (SWEEP.replace('"jacobian.input"', '"architecture"'), "grid.'architecture'"),
    (SWEEP.replace("[0.0, 0.5]", "[]"), "grid.jacobian.input=\\[\\]"),
    (SWEEP.replace("[0.0, 0.5]", "[-1.0]"), "candidate 1 .*jacobian.input=-1.0"),
    (SWEEP.replace('"train.epochs" = [1]', '"train.epochs" = [0.5]'), "candidate 1 .*train.epochs=0.5"),
    (SWEEP.replace("min_clean = 0.0", "min_clean = 2"), "sweeps\\[0\\].min_clean=2"),
    (SWEEP + "patience = 3\n", "Unknown key 'sweeps\\[0\\].patience'"),
])
def test_bad_sweeps_fail_when_the_file_is_loaded(tmp_path, text, message):
    path = _write(tmp_path, BASE + text)
    with pytest.raises(ExperimentError, match=message):
        config.load(path)


def test_the_sweep_command(tmp_path, capsys):
    path = _write(tmp_path, BASE + SWEEP.replace("[0.0, 0.5]", "[0.5]"))
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "Chosen: candidate 1" in capsys.readouterr().out
    assert cli.main(["sweep", str(_write(tmp_path, BASE)), "--out", str(tmp_path / "run")]) == 2
    assert "has no [[sweeps]]" in capsys.readouterr().err


def test_a_sweep_asking_for_more_validation_examples_than_exist_stops_before_training(tmp_path):
    (built,) = config.load_sweeps(_write(tmp_path, BASE + SWEEP.replace("examples = 16", "examples = 100000")))
    with pytest.raises(ValueError, match="Received: examples=100000"):
        sweep.run(built, tmp_path / "run", verbose=False)
    assert not (tmp_path / "run" / "sweeps").exists()
