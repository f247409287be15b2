import dataclasses
import json
import pathlib

import keras
import numpy as np
import pytest

import tinyrobust as tr
from tinyrobust import bench, cli
from tinyrobust.bench import results as results_lib
from tinyrobust.bench import per_example, runner, stages

from experiment_files import BASE, write as _write  # noqa: E402

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


_FGSM = 'adversary = { method = "fgsm_rs", epsilon = 0.05 }'



@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus = 1\n" + BASE, "Unknown key 'bogus'"),
        (BASE + "\nbogus = 1\n", "Unknown key 'threat_models.linf.bogus'"),
        (BASE.replace('quantization = "stq"', 'quantization = "stq"\nepochs = 3'), "'models\\[0\\].epochs'"),
        (BASE.replace('"FGSM"', '"Nope"'), "threat_models.linf.attacks.fgsm.type='Nope'"),
        (BASE.replace("[0.05]", "[1.5]"), "threat_models.linf.epsilons=1.5"),
        (BASE + "\n[export]\ndeployed_examples = 17\n", "than a threat model evaluates .16.*deployed_examples=17"),
        (BASE.replace("[0.05]", "[-0.1]"), "threat_models.linf.epsilons=-0.1"),
        (BASE.replace('{ type = "FGSM" }', '{ type = "PGD", steps = 0 }'), "steps=0"),
        (BASE.replace('{ type = "FGSM" }', '{ type = "PGD", stepz = 3 }'), "'threat_models.linf.attacks.fgsm.stepz'"),
        (BASE.replace('"small_cnn"', '"lenet"'), "architecture='lenet'"),
        (BASE.replace('"fashion_mnist"', '"mnist"'), "dataset='mnist'"),
        (BASE + "\n[train]\nepochs = -1\n", "train.epochs=-1"),
        (BASE.replace('options = { width = 4 }', 'distill = { teacher = "later" }'), "distill.teacher='later'"),
        (BASE.replace('options = { width = 4 }', 'distill = { teacher = "m" }'), "distill.teacher='m'"),
        (BASE.replace('options = { width = 4 }', 'distill = { teacher = "missing.keras" }'), "missing.keras"),
        (BASE.replace('options = { width = 4 }', 'distill = { teacher = "t", method = "mse" }'), "method='mse'"),
        (BASE.replace('options = { width = 4 }', 'distill = { teacher = "t", method = "kd" }\n'
                      'adversary = { method = "pgd", epsilon = 0.1 }'), "remove the adversary"),
        (BASE.replace('options = { width = 4 }', 'exits = { layers = ["conv_9"] }'), "exits.layers='conv_9'"),
        (BASE.replace('options = { width = 4 }', 'exits = { layers = [] }'), "exits.layers"),
        (BASE.replace('options = { width = 4 }', 'exits = ["relu_1"]'), "exits=\\['relu_1'\\]"),
        (BASE.replace('options = { width = 4 }', 'exits = { layers = ["relu_1"], thresholds = [1.5] }'),
         "exits.thresholds=1.5"),
        (BASE.replace('options = { width = 4 }', 'exits = { layers = ["relu_1"] }\njacobian = { input = 0.1 }'),
         "cannot also use `jacobian`"),
        (BASE.replace('options = { width = 4 }', 'neokd = { alpha = 3 }'), "add `models\\[0\\].exits"),
        (BASE.replace('options = { width = 4 }', 'exits = { layers = ["relu_1"] }\nneokd = { alpha = 3 }'),
         "adversary=None"),
        (BASE.replace('options = { width = 4 }', 'exits = { layers = ["relu_1"] }\nneokd = { attack = "max" }\n'
                      'adversary = { method = "pgd", epsilon = 0.1 }'), "neokd.attack='max'"),
        (BASE.replace('options = { width = 4 }', 'exits = { layers = ["relu_1"] }\nneokd = { exit_weights = [1] }\n'
                      'adversary = { method = "pgd", epsilon = 0.1 }'), "exit_weights=\\[1\\]"),
        (BASE + "\nmulti_exit = { targets = ['sum'] }\n", "targets=\\['sum'\\]"),
        ("seed = []\n" + BASE, "seed=\\[\\]"),
        ("seed = [1, 1]\n" + BASE, "seed=\\[1, 1\\]"),
        ("seed = [0, -1]\n" + BASE, "seed=-1"),
        ("seed = [0, 1]\n" + BASE.replace('options = { width = 4 }', 'seeds = [2]'), "models\\[0\\].seeds=\\[2\\]"),
        (BASE.replace('options = { width = 4 }', 'seeds = 0'), "models\\[0\\].seeds=0"),
        ("seed = [0, 1]\n" + BASE.replace('options = { width = 4 }', 'seeds = [0]') + '\n[[models]]\nname = "s"\n'
         'architecture = "small_cnn"\nquantization = "stq"\ndistill = { teacher = "m", method = "kd" }\n',
         "teacher 'm' must be trained with every seed"),
        ("seed = [0, 1]\n" + BASE.replace('options = { width = 4 }', 'seeds = [0]') + '\n[[models]]\nname = "s"\n'
         'architecture = "small_cnn"\nquantization = "stq"\ndistill = { teacher = "m", method = "kd", '
         'teacher_seed = 1 }\n', "teacher_seed=1"),
        # Names become file names; tables must be tables; values must have the right type and be finite.
        (BASE.replace('name = "m"', 'name = "../../evil"'), "models\\[0\\].name='../../evil'"),
        ('name = "../x"\n' + BASE, "name='../x'"),
        (BASE.replace('name = "m"', 'name = 5'), "name=5"),
        (BASE.replace("[0.05]", "[0.05, 0.05]"), "distinct. Received: epsilons=\\[0.05, 0.05\\]"),
        (BASE + "\ndeployed_epsilons = [0.1]\n", "deployed_epsilons=\\[0.1\\]"),
        (BASE + "\ndeployed_epsilons = []\n", "deployed_epsilons=\\[\\]"),
        (BASE.replace('options = { width = 4 }', 'options = { widthx = 8 }'), "options=\\{'widthx': 8\\}"),
        (BASE.replace('options = { width = 4 }', 'options = 8'), "options=8"),
        (BASE.replace('options = { width = 4 }', 'jacobian = 0.05'), "jacobian=0.05"),
        (BASE.replace('options = { width = 4 }', 'jacobian = { relu_9 = 0.05 }'), "jacobian.relu_9"),
        (BASE.replace('options = { width = 4 }', 'jacobian = { input = inf }'), "jacobian.input=inf"),
        (BASE.replace('options = { width = 4 }', 'jacobian = { input = nan }'), "jacobian.input=nan"),
        (BASE.replace('options = { width = 4 }', 'adversary = { method = "pgd", epsilon = 5.0 }'),
         "adversary.epsilon=5.0"),
        ("train = 5\n" + BASE, "train=5"),
        (BASE + "\n[train]\nlearning_rate = inf\n", "train.learning_rate=inf"),
        (BASE + "\n[train]\naugment = \"yes\"\n", "train.augment='yes'"),
        (BASE + "\n[train]\ndistribute = \"tpu\"\n", "train.distribute='tpu'"),
        (BASE + "\n[train]\nschedule = \"step\"\n", "train.schedule='step'"),
        (BASE + "\n[train]\nepochs = 3\nwarmup_epochs = 3\n", "train.warmup_epochs=3"),
        (BASE + "\n[train]\nepochs = 3\nnoise_anneal_epochs = 4\n", "train.noise_anneal_epochs=4"),
        (BASE + "\n[train]\njacobian_ramp_epochs = 0.5\n", "train.jacobian_ramp_epochs=0.5"),
        (BASE + "\n[export]\nenabled = \"no\"\n", "export.enabled='no'"),
        (BASE + "\n[export]\ncompress = 1\n", "export.compress=1"),
        (BASE + "\n[export]\ndeployed_queries = 100\ndeployed_attacks = [\"hopskipjump\"]\n", "at least 162 queries"),
        (BASE + "\nsuite = \"autoattack-plus\"\n", "suite.name='autoattack-plus'"),
        (BASE.replace('options = { width = 4 }', 'early_stopping = { collapse = 0.2 }'),
         "needs an adversarially trained model"),
        (BASE.replace('options = { width = 4 }', 'early_stopping = { collapse = 0 }\n' + _FGSM),
         "early_stopping.collapse=0"),
        (BASE.replace('options = { width = 4 }', 'early_stopping = { patience = 2 }\n' + _FGSM),
         "Unknown key 'models\\[0\\].early_stopping.patience'"),
        (BASE.replace('options = { width = 4 }', 'early_stopping = { steps = 1.5 }\n' + _FGSM),
         "early_stopping.steps=1.5"),
        (BASE.replace('options = { width = 4 }', 'early_stopping = 1\n' + _FGSM), "early_stopping=1"),
        (BASE.replace('options = { width = 4 }', 'early_stopping = {}\n' + _FGSM)
         + "\n[train]\nvalidation_fraction = 0.0\n", "train.validation_fraction=0.0"),
        (BASE.replace('options = { width = 4 }', 'adversary = { method = "pgd", epsilon = 0.1, noise = 2.0 }'),
         "`noise` is a setting of method 'n_fgsm'"),
        (BASE.replace('options = { width = 4 }', 'adversary = { method = "grad_align", epsilon = 0.1, '
                      'align_weight = -1 }'), "align_weight=-1"),
        (BASE.replace('options = { width = 4 }', 'adversary = { method = "free", epsilon = 0.1 }'),
         "adversary.method='free'"),
        (BASE.replace('options = { width = 4 }', 'jacobian = { layers = { input = 0.1 }, batch_fraction = 0 }'),
         "jacobian.batch_fraction=0"),
        (BASE.replace('options = { width = 4 }', 'jacobian = { layers = { input = 0.1 }, fraction = 0.5 }'),
         "Unknown key 'models\\[0\\].jacobian.fraction'"),
        (BASE.replace('options = { width = 4 }', 'jacobian = { layers = { relu_9 = 0.1 } }'), "jacobian.relu_9"),
        (BASE + "\n[train]\nepochs = 3\nnoise_anneal_start = 2\n", "set `train.noise_anneal_epochs` too"),
        (BASE + "\n[train]\nepochs = 3\nnoise_anneal_epochs = 2\nnoise_anneal_start = 3\n",
         "train.noise_anneal_start=3"),
        (BASE.replace('options = { width = 4 }', 'exits = { layers = ["relu_2", "relu_1"] }'),
         "in the backbone's order"),
        (BASE.replace('options = { width = 4 }', 'exits = { layers = ["relu_1"], head = "mlp" }'),
         "exits.head='mlp'"),
        (BASE.replace('attacks = { fgsm = { type = "FGSM" } }', 'attacks = { pgd = { type = "PGD", norm = "l2" } }'),
         "An attack's norm comes from its threat model"),
        (BASE.replace('attacks = { fgsm = { type = "FGSM" } }',
                      'attacks = { pgd = { type = "PGD", random_start = "no" } }'), "random_start='no'"),
        (BASE.replace('attacks = { fgsm = { type = "FGSM" } }', 'attacks = { pgd = { type = "PGD", targeted = "no" } }'),
         "targeted='no'"),
        ("seed = 4294967296\n" + BASE, "seed=4294967296"),
        (BASE.replace('name = "m"', 'name = "' + "m" * 101 + '"'), "at most 100"),
        (BASE + BASE[BASE.index("[[models]]"):BASE.index("[threat_models")].replace('name = "m"', 'name = "a-b"')
         .replace("[[models]]", "[[models]]", 1) + BASE[BASE.index("[[models]]"):BASE.index("[threat_models")]
         .replace('name = "m"', 'name = "a_b"'), "export to the same files \\(a_b.tflite\\)"),
    ],
)
def test_invalid_experiment_fails_before_work_naming_the_key(tmp_path, text, message):
    with pytest.raises(bench.ExperimentError, match=message):
        bench.load(_write(tmp_path, text))


def test_a_binary_file_is_not_an_experiment(tmp_path):
    path = tmp_path / "model.toml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(bench.ExperimentError, match="model.toml: not valid TOML"):
        bench.load(path)


def test_unknown_profile_is_rejected(tmp_path):
    with pytest.raises(bench.ExperimentError, match="profile='fast'"):
        bench.load(_write(tmp_path, BASE), profile="fast")


def test_profile_attack_suites_replace_or_change_the_base_suite(tmp_path):
    text = BASE.replace('fgsm = { type = "FGSM" }', 'fgsm = { type = "FGSM" }, pgd = { type = "PGD", steps = 20 }')
    profiles = """
[profiles.replace]
threat_models.linf.attacks = { square = { type = "Square", queries = 5 } }
[profiles.change]
threat_models.linf.attacks.pgd.steps = 2
[profiles.mixed]
threat_models.linf.attacks = { square = { type = "Square" }, pgd = { steps = 2 } }
[profiles.unknown]
threat_models.linf.attacks.apgd.steps = 2
"""
    path = _write(tmp_path, text + profiles)
    assert bench.load(path, profile="replace").threat_models["linf"].to_dict()["attacks"] == {
        "square": {"type": "Square", "queries": 5}}
    assert bench.load(path, profile="change").threat_models["linf"].to_dict()["attacks"] == {
        "fgsm": {"type": "FGSM"}, "pgd": {"type": "PGD", "steps": 2}}
    with pytest.raises(bench.ExperimentError, match="profiles.mixed.threat_models.linf.attacks"):
        bench.load(path, profile="mixed")
    with pytest.raises(bench.ExperimentError, match="profiles.unknown.threat_models.linf.attacks.apgd"):
        bench.load(path, profile="unknown")


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS.glob("*.toml")))
def test_shipped_experiments_validate_in_every_profile(name):
    import tomllib

    path = EXPERIMENTS / f"{name}.toml"
    for profile in [None, *tomllib.loads(path.read_text()).get("profiles", {})]:
        config = bench.load(path, profile=profile)
        assert config.models and config.threat_models


def test_smoke_run_end_to_end_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["bench", str(EXPERIMENTS / "fashion_mnist_tiny.toml"), "--profile", "smoke", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    files = sorted(p.name for p in (out / "results").iterdir())
    assert files == ["float__linf.json", "stq__linf.json", "stq_jr__linf.json"]
    for path in (out / "results").iterdir():
        result = results_lib.validate(json.loads(path.read_text()))
        assert result["deployed"]["arena_bytes"] > 0 and set(result["deployed"]["robust_accuracy"]) == {
            "transfer", "square", "hopskipjump"}
        assert set(result["robust_accuracy"]) == {"fgsm", "pgd", "square", "hopskipjump", "autoattack-fast",
                                                  "autoattack-fast/apgd-ce", "autoattack-fast/apgd-t",
                                                  "autoattack-fast/square"}
        assert all(result["worst_case"][e] <= result["robust_accuracy"]["autoattack-fast"][e]
                   for e in result["worst_case"])
        deployed = result["deployed"]
        assert deployed["examples"] == 8 and 0 <= deployed["keras_accuracy"] <= 1 and deployed["input_scale"] > 0
        assert all(deployed["worst_case"][e] <= deployed["clean_accuracy"] for e in deployed["worst_case"])
        assert set(deployed["eps_in_input_steps"]) == set(deployed["worst_case"])
        assert result["command"].startswith("tinyrobust bench") and result["versions"]["keras"].startswith("3.")
        assert result["machine"] == runner.machine() and result["machine"]["cores"] >= 1
        # Which examples each number counted, for paired tests of claims.
        kept = result["per_example"]
        assert per_example.unpack(kept["clean"]).mean() == pytest.approx(result["clean_accuracy"])
        assert per_example.unpack(kept["test_split"]).mean() == pytest.approx(result["test_accuracy"]["accuracy"])
        for eps, value in result["worst_case"].items():
            assert per_example.unpack(kept["worst_case"][eps]).mean() == pytest.approx(value)
        for eps, value in deployed["worst_case"].items():
            assert per_example.unpack(deployed["per_example"]["worst_case"][eps]).mean() == pytest.approx(value)
    stq = json.loads((out / "results" / "stq__linf.json").read_text())
    flt = json.loads((out / "results" / "float__linf.json").read_text())
    assert stq["model"]["packed_bytes"] < flt["model"]["packed_bytes"]
    # The deployed evaluation ran on the compressed file, which ships the ternary kernels below int8.
    assert stq["deployed"]["compressed"] and stq["deployed"]["compress"]
    assert stq["deployed"]["model_bytes"] == (out / "export" / "stq.tflite").stat().st_size
    assert stq["deployed"]["model_bytes"] < 0.6 * stq["deployed"]["int8_model_bytes"]
    assert "TFLM_DECODE" in tr.export.operator_names((out / "export" / "stq.tflite").read_bytes())
    # Clean accuracy on the whole test split (the attacked examples are its first few), from the evaluated model.
    assert {r["test_accuracy"]["examples"] for r in map(json.loads, map(pathlib.Path.read_text,
                                                                        (out / "results").iterdir()))} == {10000}
    x_split, y_split = tr.data.load_arrays("fashion_mnist", "test")
    folded = tr.export.fold_quantized_weights(keras.saving.load_model(out / "models" / "stq.keras"))
    expected = np.mean(np.argmax(folded.predict(x_split, verbose=0), -1) == y_split)
    assert stq["test_accuracy"]["accuracy"] == pytest.approx(expected, abs=2e-4)  # batching may flip a near tie
    report = (out / "report.md").read_text()
    assert "flash KB" in report and "ideal packed KB" in report and "| test split | clean |" in report
    assert "clean accuracy on the whole test split (10,000 examples;" in report
    # The terminal gets the short table (it fits 160 columns); report.md adds every attack column below it.
    short = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert short[0] == ("| model | quant. | test split | clean | worst 0.02 | worst 0.05 | worst 0.1 | TFLM worst 0.02 | "
                        "TFLM worst 0.05 | TFLM worst 0.1 | flash KB | arena KB |")
    assert max(len(line) for line in short) <= 160 and "pgd 0.1" not in short[0]
    assert "Every column" in report and " pgd 0.1 |" in report
    assert "| stq_jr | stq |" in report and "accuracy_vs_eps_linf_pgd.png" in report
    assert (out / "plots" / "accuracy_vs_size_linf.png").stat().st_size > 1000

    # Interrupted after training: results removed, models kept -> no retraining, same numbers.
    trained = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*.keras")}
    (out / "results" / "stq__linf.json").unlink()
    capsys.readouterr()
    assert cli.main(argv[:-1]) == 0
    printed = capsys.readouterr().out
    assert "stq: training" in printed and "Epoch" not in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "models").glob("*.keras")} == trained
    again = json.loads((out / "results" / "stq__linf.json").read_text())
    assert again["clean_accuracy"] == stq["clean_accuracy"] and again["robust_accuracy"] == stq["robust_accuracy"]

    # A result from before `test_accuracy` gains it from the saved model; its attacks are not redone.
    older = {k: v for k, v in stq.items() if k != "test_accuracy"}
    (out / "results" / "stq__linf.json").write_text(json.dumps(older))
    capsys.readouterr()
    assert cli.main(argv[:-1]) == 0
    printed = capsys.readouterr().out
    assert "stq__linf.json gains its accuracy on the whole test split" in printed and "attacks fgsm" not in printed
    assert json.loads((out / "results" / "stq__linf.json").read_text()) == {**older, "test_accuracy": again["test_accuracy"]}
    # Without its model file it stays as it was (nothing is retrained for it).
    (out / "results" / "stq__linf.json").write_text(json.dumps(older))
    (out / "models" / "stq.keras").rename(tmp_path / "stq.keras")
    assert cli.main(argv[:-1]) == 0
    assert json.loads((out / "results" / "stq__linf.json").read_text()) == older
    assert not (out / "models" / "stq.keras").exists()
    (tmp_path / "stq.keras").rename(out / "models" / "stq.keras")

    # Truncated files are named and redone, never reused or silently dropped.
    result_file = out / "results" / "float__linf.json"
    result_file.write_text(result_file.read_text()[:100])
    with pytest.warns(UserWarning, match="float__linf.json is corrupt"):
        assert cli.main(["report", str(out)]) == 0
    model_file = out / "models" / "float.keras"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="float.keras is (corrupt|not the file its record)"):  # its digest differs
        assert cli.main(argv[:-1]) == 0
    assert json.loads(result_file.read_text())["clean_accuracy"] == flt["clean_accuracy"]  # retrained, same seed

    # Tables and plots rebuild from the JSON files alone; two result sets compare.
    (out / "report.md").unlink()
    assert cli.main(["report", str(out)]) == 0 and (out / "report.md").is_file()
    assert cli.main(["compare", str(out), str(out)]) == 0
    assert "| stq | linf | clean |" in capsys.readouterr().out


def _minimal_result(**fields):
    """The smallest result record the schema accepts, with `fields` replaced."""
    return {
        "schema_version": 1, "experiment": "e", "profile": None, "dataset": "d", "seed": 0, "command": "",
        "versions": {},
        "model": {"name": "m", "architecture": "a", "quantization": "q", "params": 1, "int8_bytes": 1,
                  "packed_bytes": 1},
        "threat_model": {"norm": "linf", "epsilons": [0.1], "examples": 1}, "clean_accuracy": 0.5,
        "robust_accuracy": {"pgd": {"0.1": 0.2}}, "worst_case": {"0.1": 0.2}, "queries": {}, "attack_kinds": {},
        "checks": {}, "wall_time_s": {"train": 1.0, "evaluate": 2.0, "export": None}, "deployed": None,
        "quality_target": None, **fields,
    }


def test_result_schema_rejects_broken_files():
    good = _minimal_result()
    results_lib.validate(good)
    with pytest.raises(ValueError, match="clean_accuracy"):
        results_lib.validate({**good, "clean_accuracy": 1.5})
    with pytest.raises(ValueError, match="robust_accuracy.pgd"):
        results_lib.validate({**good, "robust_accuracy": {"pgd": {"0.2": 0.1}}})
    with pytest.raises(ValueError, match="missing `model`"):
        results_lib.validate({k: v for k, v in good.items() if k != "model"})
    with pytest.raises(ValueError, match="missing `model.params`"):
        results_lib.validate({**good, "model": {k: v for k, v in good["model"].items() if k != "params"}})
    with pytest.raises(ValueError, match="Expected `model.bits.conv_1` of type int. Received: model.bits.conv_1="):
        results_lib.validate({**good, "model": {**good["model"], "bits": {"conv_1": {"kernel": 2}}}})
    with pytest.raises(ValueError, match=r"Unknown field\(s\) in `threat_model`: \['epsilon'\]"):
        results_lib.validate({**good, "threat_model": {**good["threat_model"], "epsilon": 0.1}})
    with pytest.raises(ValueError, match="Expected `deployed` to be an object"):
        results_lib.validate({**good, "deployed": 5})
    results_lib.validate({**good, "machine": runner.machine()})
    with pytest.raises(ValueError, match="Expected `machine.cores` of type int"):
        results_lib.validate({**good, "machine": {**runner.machine(), "cores": "2"}})


def test_report_lists_flags_by_name_so_a_rebuilt_report_matches_the_run(tmp_path):
    result = _minimal_result(checks={"zeta_flag": "z", "alpha_flag": "a"})  # the order the evaluation raised them in
    in_run = results_lib.table([result])
    results_lib.write(result, tmp_path / "m.json")
    rebuilt = results_lib.table(results_lib.read_all(tmp_path))
    assert in_run == rebuilt
    assert in_run.index("alpha_flag: a") < in_run.index("zeta_flag: z")


def test_machine_names_the_host_and_does_without_proc_cpuinfo(monkeypatch):
    here = runner.machine()
    assert here["cpu"] and here["cores"] >= 1 and set(here["isa"]) <= set(runner._ISA_FLAGS)
    real_read = pathlib.Path.read_text

    def no_cpuinfo(self, *args, **kwargs):
        if str(self) == "/proc/cpuinfo":
            raise FileNotFoundError(self)
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", no_cpuinfo)
    elsewhere = runner.machine()
    assert elsewhere["cpu_id"] is None and elsewhere["isa"] == [] and isinstance(elsewhere["cpu"], str)
    assert elsewhere["cores"] == here["cores"] and elsewhere["system"] == here["system"]


def test_the_committed_json_schema_is_generated_from_the_typed_record():
    from tinyrobust.bench import schema

    assert json.loads(schema.SCHEMA_FILE.read_text()) == schema.json_schema()  # python -m tinyrobust.bench.schema
    generated = schema.json_schema()
    assert generated["properties"]["model"]["properties"]["bits"]["additionalProperties"] == {"type": "integer"}
    assert "deployed" in generated["required"] and "multi_exit" not in generated["required"]
    for path in EXPERIMENTS.parent.glob("benchmarks/results/*/results/*.json"):  # every committed result fits it
        results_lib.validate(json.loads(path.read_text()))


@pytest.mark.parametrize(
    "name", ["cifar10_resnet8", "svhn_resnet8", "speech_commands_dscnn", "cifar10_neokd", "cifar10_ard_mobilenetv2"])
def test_tfds_experiments_smoke_with_mock_data(tmp_path, name):
    import tensorflow_datasets as tfds

    config = bench.load(EXPERIMENTS / f"{name}.toml", profile="smoke")
    # 20 mock examples per split: the smoke profiles train on 16 (18 remain after the validation hold-out).
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        results = bench.run(config, tmp_path, command=f"test {name}", verbose=False)
    assert {(r["model"]["name"], r["threat_model"]["norm"]) for r in results} == {
        (m.name, norm) for m in config.models for norm in config.threat_models}
    for result in results:
        results_lib.validate(result)
        target = bench.QUALITY_TARGETS.get((result["dataset"], result["model"]["architecture"]))  # none for SVHN
        assert result["test_accuracy"]["examples"] == 20  # the whole (mock) test split
        assert result["quality_target"] == (None if target is None else {
            "metric": "test_accuracy", "target": target, "met": result["test_accuracy"]["accuracy"] >= target})
        assert result["deployed"]["model_bytes"] > 0
        assert (result["multi_exit"] is not None) == bool(result["model"]["exits"])


def test_synthetic_kws_experiment_smoke(tmp_path, monkeypatch):
    from tinyrobust.data import synthetic_kws

    monkeypatch.setenv("TINYROBUST_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(synthetic_kws.read, "__defaults__", (synthetic_kws.Config(2, 1, 0),))
    config = bench.load(EXPERIMENTS / "synthetic_kws_dscnn.toml", profile="smoke")
    results = bench.run(config, tmp_path / "run", verbose=False)
    assert len(results) == len(config.models) and all(r["quality_target"] is None for r in results)


def test_two_stage_distillation_runs_its_stages_apart(tmp_path, capsys):
    ard = str(EXPERIMENTS / "fashion_mnist_ard.toml")
    stage = ["bench", ard, "--profile", "smoke", "--quiet", "--models"]
    # Stage one on one machine: the adversarially trained teacher.
    assert cli.main([*stage, "teacher", "--out", str(tmp_path / "a")]) == 0
    assert [p.name for p in (tmp_path / "a" / "results").iterdir()] == ["teacher__linf.json"]
    # Stage two on another: the student needs the teacher's file.
    assert cli.main([*stage, "stq_ard", "--out", str(tmp_path / "b")]) == 2
    assert "--models teacher" in capsys.readouterr().err
    for file in ["models/teacher.keras", "results/teacher__linf.json"]:  # the teacher's result is optional
        (tmp_path / "b" / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "b" / file).write_bytes((tmp_path / "a" / file).read_bytes())
    stale = json.loads((tmp_path / "a" / "results" / "teacher__linf.json").read_text())
    stale["model"]["name"] = "renamed"
    (tmp_path / "b" / "results" / "renamed__linf.json").write_text(json.dumps(stale))
    assert cli.main([*stage, "stq_ard", "--out", str(tmp_path / "b")]) == 0
    # The report covers both stages, in the experiment's order, and no model the experiment lacks.
    rows = [line.split(" | ")[0] for line in (tmp_path / "b" / "report.md").read_text().splitlines()
            if line.startswith("| ") and " | " in line]
    assert rows[2:4] == ["| teacher", "| stq_ard"], rows  # the short table (the table of every column follows)
    student = json.loads((tmp_path / "b" / "results" / "stq_ard__linf.json").read_text())
    teacher = json.loads((tmp_path / "a" / "results" / "teacher__linf.json").read_text())
    assert student["model"]["distill"] == {"teacher": "teacher", "method": "ard", "alpha": 0.9}
    assert student["model"]["quantization"] == "stq"  # the saved model is the student
    assert student["model"]["params"] < teacher["model"]["params"] and student["deployed"]["model_bytes"] > 0
    assert cli.main([*stage, "nobody", "--out", str(tmp_path / "c")]) == 2
    assert "models='nobody'" in capsys.readouterr().err
    # Or name the teacher's file in the experiment.
    text = (EXPERIMENTS / "fashion_mnist_ard.toml").read_text().replace(
        'teacher = "teacher"', f'teacher = "{tmp_path / "a" / "models" / "teacher.keras"}"')
    student_only = bench.select_models(bench.load(_write(tmp_path, text), profile="smoke"), ["stq_ard"])
    student_only = dataclasses.replace(student_only, export=dataclasses.replace(student_only.export, enabled=False))
    results = bench.run(student_only, tmp_path / "d", verbose=False)
    assert [r["model"]["name"] for r in results] == ["stq_ard"]
    assert results[0]["model"]["distill"]["teacher"] == str(tmp_path / "a" / "models" / "teacher.keras")


def test_multi_exit_models_train_with_neokd_and_report_every_exit(tmp_path):
    text = BASE.replace('options = { width = 4 }', 'options = { width = 4 }\nexits = { layers = ["relu_1", "relu_2"], '
                        'thresholds = [0.5, 0.9] }\nneokd = { attack = "max_average" }\n'
                        'adversary = { method = "fgsm_rs", epsilon = 0.1 }')
    text += ("\nmulti_exit = { steps = 2 }\n[train]\nlimit = 128\n[export]\ncalibration_size = 16\n"
             "parity_examples = 16\ndeployed_examples = 4\ndeployed_attacks = [\"transfer\"]\n")
    config = bench.load(_write(tmp_path, text))
    (result,) = bench.run(config, tmp_path / "run", verbose=False)
    results_lib.validate(result)
    multi = result["multi_exit"]
    assert result["model"]["neokd"] == {"attack": "max_average"} and len(multi["exit_macs"]) == 3
    assert multi["exit_macs"] == sorted(multi["exit_macs"]) and set(multi["attacks"]) == {"average", "max_average"}
    assert multi["clean"][-1] == result["clean_accuracy"]  # the standard suite evaluates the final exit
    assert all(len(per_eps["0.05"]) == 3 for per_eps in multi["attacks"].values())
    lenient = multi["early_exit"]["clean"]["0.5"]
    assert 0 < lenient["relative_compute"] <= 1 and set(multi["early_exit"]) == {"clean", "average", "max_average"}
    assert result["deployed"]["model_bytes"] > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Multi-exit models" in report and "| m | 0.9 |" in report
    broken = {**multi, "attacks": {"average": {"0.05": [0.1, 0.2, 1.5]}}}
    with pytest.raises(ValueError, match="multi_exit.attacks.average.0.05"):
        results_lib.validate({**result, "multi_exit": broken})


def test_several_seeds_run_apart_and_report_mean_and_spread(tmp_path, capsys):
    text = "seed = [0, 1]\n" + BASE + "\n[train]\nlimit = 64\n[export]\nenabled = false\n"
    config = bench.load(_write(tmp_path, text))
    assert config.seeds == (0, 1) and config.seed == 0
    results = bench.run(config, tmp_path / "run", verbose=False)
    assert [r["seed"] for r in results] == [0, 1]
    assert sorted(p.parent.parent.name for p in (tmp_path / "run").rglob("results/*.json")) == ["seed_0", "seed_1"]
    clean = [r["clean_accuracy"] for r in results]
    mean, spread = 100 * sum(clean) / 2, 100 * abs(clean[0] - clean[1]) / 2 ** 0.5
    split = [r["test_accuracy"]["accuracy"] for r in results]
    split_mean, split_spread = 100 * sum(split) / 2, 100 * abs(split[0] - split[1]) / 2 ** 0.5
    report = (tmp_path / "run" / "report.md").read_text()
    assert "mean ± std over seeds 0, 1" in report
    assert f"| m | stq | {split_mean:.1f} ± {split_spread:.1f} | {mean:.1f} ± {spread:.1f} |" in report
    # `report` rebuilds the same table from the JSON files of both seeds.
    (tmp_path / "run" / "report.md").unlink()
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.md").read_text() == report


def test_a_model_can_run_with_only_some_of_the_seeds(tmp_path):
    extra = ('\n[[models]]\nname = "once"\narchitecture = "small_cnn"\nquantization = "float"\n'
             'options = { width = 4 }\nseeds = [1]\n')
    text = "seed = [0, 1]\n" + BASE.replace("[threat_models.linf]", extra + "[threat_models.linf]")
    text += "\n[train]\nlimit = 64\n[export]\nenabled = false\n"
    config = bench.load(_write(tmp_path, text))
    assert config.model("once").seeds == (1,) and [m.name for m in config.with_seed(0).models] == ["m"]
    results = bench.run(config, tmp_path / "run", verbose=False)
    assert sorted((r["model"]["name"], r["seed"]) for r in results) == [("m", 0), ("m", 1), ("once", 1)]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| once (seed 1) | float |" in report and "| m | stq |" in report
    # Which seeds run a model is not a setting of the model: its fingerprint is that of the model without the key.
    alone = bench.load(_write(tmp_path, text.replace("seeds = [1]\n", "")))
    assert (runner.model_settings(config.with_seed(1), tmp_path)["once"]
            == runner.model_settings(alone.with_seed(1), tmp_path)["once"])


def test_deployed_attacks_can_run_at_some_of_the_radii(tmp_path):
    text = BASE.replace("[0.05]", "[0.05, 0.1]") + "\ndeployed_epsilons = [0.1]\n[train]\nlimit = 64\n[export]\n"
    text += 'calibration_size = 16\nparity_examples = 16\ndeployed_examples = 8\ndeployed_attacks = ["transfer"]\n'
    config = bench.load(_write(tmp_path, text))
    assert config.threat_models["linf"].deployed_epsilons == (0.1,)
    (result,) = bench.run(config, tmp_path / "run", verbose=False)
    assert set(result["robust_accuracy"]["fgsm"]) == {"0.05", "0.1"}  # the Keras model: every radius
    assert set(result["deployed"]["worst_case"]) == set(result["deployed"]["robust_accuracy"]["transfer"]) == {"0.1"}
    header = next(line for line in (tmp_path / "run" / "report.md").read_text().splitlines() if "TFLM clean" in line)
    assert "TFLM worst 0.1" in header and "TFLM worst 0.05" not in header and "worst 0.05" in header
    # Absent, the key leaves the settings (and fingerprints) of earlier results as they were.
    assert "deployed_epsilons" not in bench.load(_write(tmp_path, BASE)).threat_models["linf"].to_dict()


def test_one_teacher_can_teach_the_students_of_every_seed(tmp_path):
    student = ('\n[[models]]\nname = "s"\narchitecture = "small_cnn"\nquantization = "stq"\n'
               'options = { width = 4 }\ndistill = { teacher = "m", method = "kd", teacher_seed = 0 }\n')
    text = "seed = [0, 1]\n" + BASE.replace('options = { width = 4 }', 'options = { width = 4 }\nseeds = [0]')
    text = text.replace("[threat_models.linf]", student + "[threat_models.linf]")
    text += "\n[train]\nlimit = 64\n[export]\nenabled = false\n"
    results = bench.run(bench.load(_write(tmp_path, text)), tmp_path / "run", verbose=False)
    assert sorted((r["model"]["name"], r["seed"]) for r in results) == [("m", 0), ("s", 0), ("s", 1)]
    assert not (tmp_path / "run" / "seed_1" / "models" / "m.keras").exists()  # the teacher was trained once
    teacher = json.loads((tmp_path / "run" / "seed_0" / "models" / "m.train.json").read_text())["fingerprint"]
    for seed in (0, 1):  # both students name that teacher in their settings
        record = json.loads((tmp_path / "run" / f"seed_{seed}" / "models" / "s.train.json").read_text())
        assert record["settings"]["teacher"] == teacher
    # Without `teacher_seed`, each seed's student needs its own teacher.
    with pytest.raises(bench.ExperimentError, match="must be trained with every seed"):
        bench.load(_write(tmp_path, text.replace(", teacher_seed = 0", "")))


def test_plain_multi_exit_model_trains_on_the_mean_exit_cross_entropy(tmp_path):
    text = BASE.replace('options = { width = 4 }', 'options = { width = 4 }\nexits = { layers = ["relu_2"] }')
    text += "\nmulti_exit = { steps = 1, targets = ['average'] }\n[train]\nlimit = 64\n[export]\nenabled = false\n"
    (result,) = bench.run(bench.load(_write(tmp_path, text)), tmp_path / "run", verbose=False)
    assert result["model"]["neokd"] is None and len(result["multi_exit"]["clean"]) == 2
    assert set(result["multi_exit"]["attacks"]) == {"average"}


def test_distribute_mirrored_trains_the_same_model_and_records_it(tmp_path):
    text = BASE + "\n[train]\nlimit = 64\n[export]\nenabled = false\n"
    single = bench.load(_write(tmp_path, text))
    mirrored = bench.load(_write(tmp_path, text.replace("limit = 64", 'limit = 64\ndistribute = "mirrored"')))
    assert "distribute" not in single.train.to_dict()  # one device: the canonical form (and fingerprint) of before
    assert mirrored.train.distribute == "mirrored"
    weights = []
    for config, out in ((single, tmp_path / "single"), (mirrored, tmp_path / "mirrored")):
        model, _ = runner.train(config, config.models[0], out, verbose=False)
        weights.append(model.get_weights())
        record = json.loads((out / "models" / "m.train.json").read_text())
        assert record["settings"]["train"].get("distribute") == config.train.distribute
    for a, b in zip(*weights):  # one CPU: a mirrored run of one replica is the same step
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_the_recipe_schedules_learning_rate_ramps_and_noise_where_the_model_has_them(tmp_path):
    recipe = ("\n[train]\nepochs = 4\nlimit = 64\nschedule = \"cosine\"\nwarmup_epochs = 1\n"
              "jacobian_ramp_epochs = 2\nepsilon_ramp_epochs = 2\nnoise_anneal_epochs = 2\n[export]\nenabled = false\n")
    plain = bench.load(_write(tmp_path, BASE + "\n[train]\nepochs = 4\n"))
    assert set(plain.train.to_dict()) == {"epochs", "batch_size", "learning_rate", "limit", "augment",
                                          "validation_fraction"}  # absent: the fingerprints of before
    robust = BASE.replace('options = { width = 4 }', 'options = { width = 4 }\njacobian = { input = 0.05 }\n'
                          'adversary = { method = "fgsm_rs", epsilon = 0.05 }')
    config = bench.load(_write(tmp_path, robust + recipe))
    model = stages.build_model(config.models[0], tr.data.info("fashion_mnist"), config.seed)
    found = {type(c).__name__: c for c in stages.recipe_callbacks(config.train, model)}
    assert set(found) == {"CosineLearningRate", "JacobianWeightScheduler", "EpsilonScheduler",
                          "QuantizationNoiseScheduler"}
    assert found["QuantizationNoiseScheduler"].start_epoch == 2 and found["CosineLearningRate"].warmup_epochs == 1
    float_model = bench.load(_write(tmp_path, BASE.replace('"stq"', '"float"') + recipe))
    model = stages.build_model(float_model.models[0], tr.data.info("fashion_mnist"), float_model.seed)
    assert [type(c).__name__ for c in stages.recipe_callbacks(float_model.train, model)] == ["CosineLearningRate"]
    trained, _ = runner.train(config, config.models[0], tmp_path / "run", verbose=False)
    assert trained.epsilon_scale.numpy() == 1.0 and trained.jacobian_scale.numpy() == 1.0
    assert float(trained.optimizer.learning_rate.numpy()) == pytest.approx(0.001 * (1 + np.cos(np.pi * 2 / 3)) / 2)
    assert all(q.stochasticity.numpy() == 0.0 for q in tr.quantizers.stochastic_quantizers(trained))


def test_early_stopping_selects_the_epoch_by_held_out_pgd_and_records_it(tmp_path):
    text = BASE.replace('options = { width = 4 }', 'options = { width = 4 }\n' + _FGSM +
                        '\nearly_stopping = { examples = 32, steps = 2 }')
    text += "\n[train]\nepochs = 3\nlimit = 64\n[export]\nenabled = false\n"
    config = bench.load(_write(tmp_path, text))
    assert config.models[0].early_stopping == {"examples": 32, "steps": 2, "collapse": 0.2}
    (result,) = bench.run(config, tmp_path / "run", verbose=False)
    record = result["early_stopping"]
    assert result["model"]["early_stopping"] == {"examples": 32, "steps": 2, "collapse": 0.2}
    history = record["robust_accuracy"]
    assert 1 <= len(history) <= 3 and all(0.0 <= a <= 1.0 for a in history)
    assert record["best_epoch"] == 1 + int(np.argmax(history))
    assert (record["stopped_epoch"] is None) == (len(history) == 3)
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"- m: PGD-2 on 32 examples, best {100 * max(history):.1f}% after epoch {record['best_epoch']}" in report
    # The kept weights are the best epoch's: the saved model scores that accuracy on the held-out examples.
    x, y = tr.data.load_arrays("fashion_mnist", "validation", limit=32)
    guard = tr.callbacks.RobustEarlyStopping(x, y, attack=tr.attacks.PGD(0.05, steps=2, rel_step_size=0.25))
    guard.set_model(keras.saving.load_model(tmp_path / "run" / "models" / "m.keras"))
    assert guard.evaluate() == pytest.approx(max(history))


def test_a_second_run_into_a_busy_folder_stops_at_once(tmp_path):
    import os
    import subprocess
    import sys

    config = bench.load(_write(tmp_path, BASE))
    out = tmp_path / "run"
    out.mkdir()
    holder = ("import fcntl, os, sys, time\nhandle = open(sys.argv[1], 'a+')\nfcntl.flock(handle, fcntl.LOCK_EX)\n"
              "handle.seek(0); handle.truncate(); handle.write(str(os.getpid())); handle.flush()\n"
              "print('locked', flush=True)\ntime.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", holder, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"Another run \(process {other.pid}\) is writing into"):
            bench.run(config, out, verbose=False)
        assert not (out / "experiment.json").exists()
    finally:
        other.terminate()  # SIGTERM: the operating system releases its lock
        other.wait()
    # What a dead or killed run leaves (a .lock naming a process, even a live one) holds nothing.
    (out / ".lock").write_text(str(os.getpid()))
    from tinyrobust import files

    with files.folder_lock(out):
        pass
    (out / "file").write_text("x")
    with pytest.raises(ValueError, match="output folder is a file"):
        bench.run(config, out / "file", verbose=False)


RESUMABLE = BASE.replace('options = { width = 4 }', 'options = { width = 4 }\njacobian = { input = 0.05, relu_1 = 0.01 }\n'
                         'adversary = { method = "pgd", epsilon = 0.05, steps = 2 }') + """
[train]
epochs = 3
limit = 96
batch_size = 32
augment = true
schedule = "cosine"
warmup_epochs = 1
jacobian_ramp_epochs = 2
epsilon_ramp_epochs = 2
noise_anneal_epochs = 2
[export]
enabled = false
"""


@pytest.mark.parametrize("stop_at", [(1, 1), (2, 0)], ids=["mid-epoch", "epoch-boundary"])
def test_a_killed_run_resumes_bit_for_bit(tmp_path, monkeypatch, stop_at):
    import keras
    import numpy as np

    from tinyrobust.bench import runner

    config = bench.load(_write(tmp_path, RESUMABLE))
    (spec,) = config.models
    reference, _ = runner.train(config, spec, tmp_path / "whole", verbose=False)

    class Killed(Exception):
        pass

    original = tr.callbacks.StopOnNonFiniteLoss.on_train_batch_begin

    def kill(self, batch, logs=None):  # the process dies at (epoch, batch)
        if (self._epoch, batch) == stop_at:
            raise Killed
        return original(self, batch, logs)

    monkeypatch.setattr(tr.callbacks.StopOnNonFiniteLoss, "on_train_batch_begin", kill)
    with pytest.raises(Killed):
        runner.train(config, spec, tmp_path / "resumed", verbose=False)
    assert not (tmp_path / "resumed" / "models" / "m.keras").exists()
    clock = json.loads((tmp_path / "resumed" / "checkpoints" / "m" / "clock.json").read_text())
    assert clock["epoch"] == stop_at[0] - 1 and clock["seconds"] > 0  # the finished epochs' time
    monkeypatch.setattr(tr.callbacks.StopOnNonFiniteLoss, "on_train_batch_begin", original)
    keras.utils.set_random_seed(123)  # a new process: other global random state
    resumed, seconds = runner.train(config, spec, tmp_path / "resumed", verbose=False)
    record = json.loads((tmp_path / "resumed" / "models" / "m.train.json").read_text())
    assert record["resumed"] and record["seconds"] == seconds > clock["seconds"]  # earlier epochs counted
    assert not (tmp_path / "resumed" / "checkpoints" / "m").exists()
    assert len(resumed.weights) == len(reference.weights)
    for a, b in zip(reference.weights, resumed.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


def test_artifacts_are_reused_only_with_the_settings_that_made_them(tmp_path, capsys):
    small = BASE + "\n[train]\nlimit = 64\n[export]\nenabled = false\n"
    out = tmp_path / "run"
    (first,) = bench.run(bench.load(_write(tmp_path, small)), out)
    assert first["settings"]["model_settings"]["train"]["limit"] == 64 and len(first["fingerprint"]) == 16
    trained = (out / "models" / "m.keras").stat().st_mtime_ns
    capsys.readouterr()

    # Other epsilons: the model is reused, the result is redone (never reported under the new settings).
    (second,) = bench.run(bench.load(_write(tmp_path, small.replace("[0.05]", "[0.1]"))), out)
    printed = capsys.readouterr().out
    assert "m__linf.json came from other settings (threat_model.epsilons: [0.05] -> [0.1]" in printed
    assert (out / "models" / "m.keras").stat().st_mtime_ns == trained and "Epoch" not in printed
    assert list(second["robust_accuracy"]["fgsm"]) == ["0.1"] and second["fingerprint"] != first["fingerprint"]

    # Another recipe: the trained model would be wrong; the run stops before any work, naming the change.
    before = (out / "experiment.json").read_text()
    longer = small.replace("limit = 64", "limit = 64\nepochs = 2")
    with pytest.raises(bench.ExperimentError, match=r"(?s)models/m.keras: train.epochs: 1 -> 2.*--fresh"):
        bench.run(bench.load(_write(tmp_path, longer)), out)
    assert (out / "experiment.json").read_text() == before
    assert cli.main(["bench", str(_write(tmp_path, longer)), "--out", str(out), "--quiet"]) == 2
    assert "--fresh" in capsys.readouterr().err

    # An unfinished training of other settings is work too; --fresh deletes it and starts over.
    (out / "checkpoints" / "m").mkdir(parents=True)
    with pytest.raises(bench.ExperimentError, match="checkpoints/m .unfinished training.: no record"):
        bench.run(bench.load(_write(tmp_path, longer)), out)
    assert cli.main(["bench", str(_write(tmp_path, longer)), "--out", str(out), "--quiet", "--fresh"]) == 0
    (third,) = results_lib.read_all(out)
    assert third["settings"]["model_settings"]["train"]["epochs"] == 2
    assert not (out / "checkpoints" / "m").exists()

    # Tables and comparisons flag results that do not come from the same settings.
    other = json.loads(json.dumps(third))
    other["model"]["name"] = "m2"
    other["settings"]["model_settings"]["train"]["epochs"] = 1
    assert "- m2 (seed 0) vs m: train.epochs: 2 -> 1" in bench.table([third, other])
    assert "Mixed settings" not in bench.table([third])
    legacy = {k: v for k, v in third.items() if k not in ("settings", "fingerprint")}
    assert "records no settings" in bench.table([third, legacy])
    other["model"]["name"] = "m"
    assert "- linf: train.epochs: 2 -> 1" in bench.compare([third], [other])
    assert "Settings differ" not in bench.compare([third], [third])


@pytest.mark.parametrize("extra, message", [
    ("[export]\ncalibration_size = 100000000\n", "more examples than the train split holds .54,000.. "
                                                 "Received: export.calibration_size=100000000"),
    ("[export]\nparity_examples = 10001\n", "Received: export.parity_examples=10001"),
    ("[train]\nlimit = 54001\n", "Received: train.limit=54001"),
    ("[[models]]\nname = \"r\"\narchitecture = \"small_cnn\"\n" + _FGSM + "\nearly_stopping = { examples = 6001 }\n",
     "more examples than the validation split holds .6,000.. Received: models.1..early_stopping.examples=6001"),
])
def test_sizes_beyond_their_split_are_refused_before_any_work(tmp_path, extra, message):
    text = BASE + "\n" + extra
    with pytest.raises(bench.ExperimentError, match=message):
        bench.run(bench.load(_write(tmp_path, text)), tmp_path / "run", verbose=False)
    assert not (tmp_path / "run" / "experiment.json").exists() and not (tmp_path / "run" / "models").exists()


def test_an_experiment_is_frozen_specs_whose_canonical_form_is_the_file(tmp_path):
    config = bench.load(_write(tmp_path, BASE))
    assert isinstance(config, bench.Experiment) and isinstance(config.models[0], bench.ModelSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models[0].name = "other"
    with pytest.raises(TypeError):  # nested tables are read-only too
        config.threat_models["linf"].attacks["fgsm"]["type"] = "PGD"
    canonical = config.to_dict()
    assert canonical["models"] == [{"name": "m", "architecture": "small_cnn", "quantization": "stq",
                                    "options": {"width": 4}}]
    assert canonical["threat_models"]["linf"]["epsilons"] == [0.05] and "norm" not in canonical["threat_models"]["linf"]
    json.dumps(canonical)  # plain JSON
    reseeded = config.with_seed(3)
    assert (reseeded.seed, reseeded.seeds, config.seed) == (3, (3,), 0)
    staged = bench.select_models(config, ["m"])
    assert staged.defined_models == ("m",) and staged.model("m") is staged.models[0] and staged.model("x") is None


def test_one_step_methods_batch_fraction_jr_conv_exits_and_annealed_selection_from_an_experiment_file(tmp_path):
    """N-FGSM with JR on a quarter of each batch, and a GradAlign multi-exit network with convolutional exit heads,
    selected on its weakest exit among the epochs after the noise fade."""
    text = """
dataset = "fashion_mnist"
[[models]]
name = "nfgsm_jr"
architecture = "small_cnn"
quantization = "stq"
options = { width = 4 }
adversary = { method = "n_fgsm", epsilon = 0.05 }
jacobian = { layers = { input = 0.01, relu_2 = 0.01 }, batch_fraction = 0.25 }
[[models]]
name = "exits"
architecture = "small_cnn"
quantization = "stq"
options = { width = 4 }
adversary = { method = "grad_align", epsilon = 0.05, align_weight = 0.5 }
exits = { layers = ["relu_1"], head = "conv" }
early_stopping = { examples = 16, steps = 1 }
[train]
epochs = 3
limit = 64
noise_anneal_epochs = 1
noise_anneal_start = 2
[threat_models.linf]
epsilons = [0.05]
examples = 16
attacks = { fgsm = { type = "FGSM" } }
multi_exit = { steps = 1, targets = ["average"] }
[export]
enabled = false
"""
    config = bench.load(_write(tmp_path, text))
    assert config.models[0].jacobian == {"layers": {"input": 0.01, "relu_2": 0.01}, "batch_fraction": 0.25}
    results = {r["model"]["name"]: r for r in bench.run(config, tmp_path / "run", verbose=False)}
    for result in results.values():
        results_lib.validate(result)
    stopping = results["exits"]["early_stopping"]
    assert stopping["keep_from_epoch"] == 2 and stopping["best_epoch"] >= 2  # the noise is gone from epoch 2 on
    trained = keras.saving.load_model(tmp_path / "run" / "models" / "exits.keras")
    assert "exit_1_conv" in {layer.name for layer in trained.layers}
    assert results["exits"]["model"]["adversary"] == {"method": "grad_align", "epsilon": 0.05, "align_weight": 0.5}
    assert keras.saving.load_model(tmp_path / "run" / "models" / "nfgsm_jr.keras").jacobian.batch_fraction == 0.25


def test_training_history_is_kept_beside_each_model_and_plotted(tmp_path):
    text = BASE + "\n[train]\nepochs = 2\nlimit = 64\n[export]\nenabled = false\n"
    bench.run(bench.load(_write(tmp_path, text)), tmp_path / "run", verbose=False)
    history = results_lib.read_history(tmp_path / "run" / "models" / "m.history.csv")
    assert history["epoch"] == [1, 2] and len(history["loss"]) == 2 and len(history["accuracy"]) == 2
    events = list((tmp_path / "run" / "logs" / "m").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)  # TensorBoard logs, readable by `tensorboard`
    assert (tmp_path / "run" / "plots" / "training_m.png").stat().st_size > 1000
    assert "training_m.png" in (tmp_path / "run" / "report.md").read_text()


def test_a_history_with_an_epoch_written_twice_keeps_its_last_values(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("epoch,loss\n0,2.0\n1,1.5\n1,1.4\nepoch,loss\n2,1.0\n")
    assert results_lib.read_history(path) == {"epoch": [1, 2, 3], "loss": [2.0, 1.4, 1.0]}


def test_fresh_deletes_exactly_the_models_own_files(tmp_path):
    """`--models a --fresh` once also deleted model `a.b`'s files (a glob `a.*`)."""
    text = BASE.replace('name = "m"', 'name = "a"') + BASE[BASE.index("[[models]]"):BASE.index("[threat_models")].replace(
        'name = "m"', 'name = "a.b"') + "\n[train]\nlimit = 32\n[export]\nenabled = false\n"
    text = text.replace(BASE[BASE.index("[threat_models"):], "", 1) + BASE[BASE.index("[threat_models"):]
    config = bench.load(_write(tmp_path, text))
    assert [m.name for m in config.models] == ["a", "a.b"]
    out = tmp_path / "run"
    bench.run(config, out, verbose=False)
    kept = {p.name for p in (out / "models").iterdir() if p.name.startswith("a.b.")}
    assert "a.b.keras" in kept
    bench.run(bench.select_models(config, ["a"]), out, verbose=False, fresh=True)
    assert {p.name for p in (out / "models").iterdir() if p.name.startswith("a.b.")} == kept


def test_a_corrupt_training_checkpoint_is_named_and_the_model_trains_again(tmp_path, monkeypatch):
    """A kill or a full disk during the checkpoint write left a truncated HDF5 file that broke every rerun with a
    traceback: the previous copy is used when it reads, and with neither the model trains from epoch 1."""
    config = bench.load(_write(tmp_path, RESUMABLE))
    (spec,) = config.models

    class Killed(Exception):
        pass

    original = tr.callbacks.StopOnNonFiniteLoss.on_train_batch_begin

    def kill(self, batch, logs=None):
        if (self._epoch, batch) == (2, 0):
            raise Killed
        return original(self, batch, logs)

    monkeypatch.setattr(tr.callbacks.StopOnNonFiniteLoss, "on_train_batch_begin", kill)
    with pytest.raises(Killed):
        runner.train(config, spec, tmp_path / "run", verbose=False)
    monkeypatch.setattr(tr.callbacks.StopOnNonFiniteLoss, "on_train_batch_begin", original)
    checkpoint = tmp_path / "run" / "checkpoints" / "m"
    for name in ("latest.weights.h5", "latest.weights.h5.bkp"):
        path = checkpoint / name
        path.write_bytes(path.read_bytes()[:500])  # both copies cut short
    with pytest.warns(UserWarning, match="training checkpoint of 'm' .* is corrupt"):
        model, _ = runner.train(config, spec, tmp_path / "run", verbose=False)
    record = json.loads((tmp_path / "run" / "models" / "m.train.json").read_text())
    assert not record["resumed"] and (tmp_path / "run" / "models" / "m.keras").is_file()


def test_a_full_disk_ends_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "results" / "m__linf.json"))

    monkeypatch.setattr(bench, "run", full)
    assert cli.main(["bench", str(_write(tmp_path, BASE)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "No space left on device" in err and "Traceback" not in err


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["worst_case"].update({"0.1": r["clean_accuracy"] + 0.1}), "Worst case above clean accuracy"),
    (lambda r: r["robust_accuracy"]["pgd"].update({"0.1": 0.0}), "worst case <= every attack <= clean"),
    (lambda r: r["worst_case"].update({"0.02": 0.0}), "rises with eps"),
])
def test_a_hand_edited_result_is_refused_naming_its_file(tmp_path, capsys, edit, message):
    source = EXPERIMENTS.parent / "benchmarks/results/fashion_mnist_tiny_demo/results/stq_jr__linf.json"
    result = json.loads(source.read_text())
    edit(result)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "stq_jr__linf.json").write_text(json.dumps(result))
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "stq_jr__linf.json" in err and message in err


def test_a_profile_name_must_be_a_plain_name(tmp_path):
    with pytest.raises(bench.ExperimentError, match="Received: profile='../x'"):
        bench.load(_write(tmp_path, BASE), profile="../x")


def test_a_model_file_replaced_by_another_is_trained_again_not_evaluated_under_its_name(tmp_path):
    text = BASE.replace('name = "m"', 'name = "a"') + "\n[train]\nlimit = 32\n[export]\nenabled = false\n"
    config = bench.load(_write(tmp_path, text))
    out = tmp_path / "run"
    bench.run(config, out, verbose=False)
    record = json.loads((out / "models" / "a.train.json").read_text())
    assert record["model_sha256"] == runner.fingerprints.file_digest(out / "models" / "a.keras")
    other = tr.models.small_cnn(width=8)  # another model's file in its place
    other.save(out / "models" / "a.keras")
    (out / "results" / "a__linf.json").unlink()
    with pytest.warns(UserWarning, match="a.keras is not the file its record"):
        bench.run(config, out, verbose=False)
    retrained = keras.saving.load_model(out / "models" / "a.keras")
    assert retrained.count_params() != other.count_params()


@pytest.mark.parametrize("make, message", [
    (lambda p: tr.models.small_cnn(input_shape=(32, 32, 3), width=4).save(p), r"inputs of shape \(32, 32, 3\)"),
    (lambda p: tr.models.small_cnn(num_classes=3, width=4).save(p), "gives 3 logits"),
    (lambda p: p.write_bytes(b"not a keras file"), "does not load"),
])
def test_a_teacher_file_that_does_not_fit_is_refused_when_the_file_loads(tmp_path, make, message):
    teacher = tmp_path / "teacher.keras"
    make(teacher)
    text = BASE.replace('options = { width = 4 }', f'options = {{ width = 4 }}\ndistill = {{ teacher = "{teacher}", '
                        'method = "ard" }\nadversary = { method = "fgsm_rs", epsilon = 0.05 }')
    with pytest.raises(bench.ExperimentError, match=message):
        bench.load(_write(tmp_path, text))


def test_a_data_set_whose_contents_changed_is_not_reused_under_the_same_name(tmp_path, monkeypatch):
    from tinyrobust import data

    text = BASE + "\n[train]\nlimit = 32\n[export]\nenabled = false\n"
    config = bench.load(_write(tmp_path, text))
    out = tmp_path / "run"
    bench.run(config, out, verbose=False)
    assert json.loads((out / "models" / "m.train.json").read_text())["settings"]["data"] == data.digest(
        "fashion_mnist")
    monkeypatch.setitem(data._DIGESTS, "fashion_mnist", "0123456789abcdef")  # new files under the same name
    with pytest.raises(bench.ExperimentError, match="data: .* -> \"0123456789abcdef\""):
        bench.run(config, out, verbose=False)


_THREAT_TABLE = BASE.split("[threat_models.linf]")[0]


@pytest.mark.parametrize("text, message", [
    ('dataset = "fashion_mnist"\nmodels = [1]\n[threat_models.linf]\nepsilons = [0.05]\nexamples = 16\n'
     'attacks = { fgsm = { type = "FGSM" } }\n', r"`models\[0\]` to be a table.*Received: models\[0\]=1"),
    ("threat_models = { linf = 1 }\n" + _THREAT_TABLE, r"`threat_models.linf` to be a table.*Received: "),
    ("profiles = 1\n" + BASE, r"`profiles` to hold tables.*Received: profiles=1"),
    (BASE + "\n[profiles]\nx = 1\n", r"Received: profiles=\{'x': 1\}"),
    (BASE + "\n[profiles.x]\nmodels = 1\n", r"`profiles.x.models` to be a list of model tables"),
    (BASE + "\n[profiles.x]\ntrain = 1\n", r"`profiles.x.train` to be a table"),
    (BASE + "\n[profiles.x]\nepochs = 1\n", r"Unknown key 'profiles.x.epochs'"),
    ("description = 3\n" + BASE, r"`description` to be a string. Received: description=3"),
    (BASE + '\n[export]\ndeployed_attacks = "square"\n', r"`export.deployed_attacks` to be a list"),
    (BASE + '\n[export]\narena_limit = "big"\n', r"export.arena_limit.*Received: export.arena_limit='big'"),
    (BASE + '\n[export]\narena_limit = 0.5\n', r"Received: export.arena_limit=0.5"),
])
def test_a_wrong_typed_table_is_named_at_load_in_any_profile(tmp_path, text, message):
    """Each of these once raised a TypeError traceback at load, or was accepted."""
    with pytest.raises(bench.ExperimentError, match=message):
        bench.load(_write(tmp_path, text))


def test_arena_limit_none_ships_the_smallest_flash_and_keeps_old_fingerprints(tmp_path):
    default = bench.load(_write(tmp_path, BASE))
    assert default.export.arena_limit == tr.export.ARENA_LIMIT and default.export.to_dict()["arena_limit"] == 1.1
    smallest = bench.load(_write(tmp_path, BASE + '\n[export]\narena_limit = "none"\n'))
    assert smallest.export.arena_limit is None and "arena_limit" not in smallest.export.to_dict()
    plain = bench.load(_write(tmp_path, BASE + '\n[export]\ncompress = false\n'))
    assert "arena_limit" not in plain.export.to_dict()  # nothing to group: the fingerprint of before
