"""The bench's stages one by one, and the run folder they share."""

import json

import keras
import numpy as np
import pytest

import tinyrobust as tr
from tinyrobust import bench, multiexit
from tinyrobust.bench import fingerprints, runner, stages
from tinyrobust.bench.run_folder import RunFolder, read_reusable
from tinyrobust.training import RobustModel

from experiment_files import BASE, write as _write  # noqa: E402

QUICK = BASE + "\n[train]\nlimit = 64\n[export]\ncalibration_size = 16\nparity_examples = 16\ndeployed_examples = 8\n" \
               "deployed_queries = 5\n"


def _experiment(tmp_path, text=QUICK):
    return bench.load(_write(tmp_path, text))


def _say(verbose=False):
    say = runner._Say(verbose)
    return say


def test_the_run_folder_names_every_artifact_and_finds_teachers(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.model("m") == tmp_path / "run" / "models" / "m.keras"
    assert folder.result("m", "l2") == tmp_path / "run" / "results" / "m__l2.json"
    assert folder.shipped("my_model") == tmp_path / "run" / "export" / "my_model.tflite"
    assert folder.deployed("my-model", "linf").name == "my-model__linf.deployed.json"
    student = bench.ModelSpec(name="s", architecture="small_cnn", quantization="stq", options={},
                              distill={"teacher": "t", "teacher_seed": 0})
    seeded = RunFolder(tmp_path / "out" / "seed_1")
    assert seeded.teacher(student, seed=1) == tmp_path / "out" / "seed_0" / "models" / "t.keras"
    assert seeded.teacher(student, seed=0) == seeded.model("t")
    given = bench.ModelSpec(name="s", architecture="small_cnn", quantization="stq", options={},
                            distill={"teacher": "elsewhere/t.keras"})
    assert str(seeded.teacher(given, seed=1)) == "elsewhere/t.keras"


def test_the_run_folder_lock_refuses_a_file_and_a_corrupt_record_is_redone(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file. Received: out_dir="):
        with RunFolder(tmp_path / "file").lock():
            pass
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": ')
    with pytest.warns(UserWarning, match="is corrupt"):
        assert read_reusable(broken) is None
    assert not broken.exists()
    with RunFolder(tmp_path / "run").lock() as folder:
        assert folder.path.is_dir()


def test_the_earlier_work_check_names_what_changed(tmp_path):
    config = _experiment(tmp_path)
    folder = RunFolder(tmp_path / "run")
    settings = runner.model_settings(config, folder)
    folder.model("m").parent.mkdir(parents=True)
    folder.model("m").write_bytes(b"model")
    old = json.loads(json.dumps(settings["m"]))
    old["train"]["epochs"] = 7
    folder.train_record("m").write_text(json.dumps({"settings": old, "fingerprint": fingerprints.fingerprint(old)}))
    with pytest.raises(bench.ExperimentError, match=r"models/m.keras: train.epochs: 7 -> 1"):
        folder.check_earlier_work(settings)
    folder.delete_earlier_work(config.models, _say())
    assert not folder.model("m").exists() and not folder.train_record("m").exists()
    folder.check_earlier_work(settings)  # nothing left to disagree with


def test_build_model_gives_the_engine_each_spec_asks_for(tmp_path):
    info = tr.data.info("fashion_mnist")
    plain = bench.ModelSpec(name="p", architecture="small_cnn", quantization="stq", options={"width": 4})
    assert not isinstance(stages.build_model(plain, info, 0), RobustModel)
    robust = bench.ModelSpec(name="r", architecture="small_cnn", quantization="stq", options={"width": 4},
                             jacobian={"layers": {"input": 0.01}, "batch_fraction": 0.5},
                             adversary={"method": "n_fgsm", "epsilon": 0.05})
    model = stages.build_model(robust, info, 3)
    assert isinstance(model, RobustModel) and model.deployable() is model
    assert model.jacobian.batch_fraction == 0.5 and model.adversary.method == "n_fgsm" and model.adversary.seed == 3
    exits = {"layers": ["relu_1", "relu_2"], "thresholds": [0.9]}
    multi = bench.ModelSpec(name="x", architecture="small_cnn", quantization="stq", options={"width": 4}, exits=exits,
                            adversary={"method": "fgsm_rs", "epsilon": 0.05})
    trainer = stages.build_model(multi, info, 0)
    assert isinstance(trainer, multiexit.NEOKD) and len(trainer.deployable().outputs) == 3
    student = bench.ModelSpec(name="s", architecture="small_cnn", quantization="stq", options={"width": 4},
                              distill={"teacher": "t"})
    with pytest.raises(FileNotFoundError, match="teacher of 's' is not trained"):
        stages.build_model(student, info, 0, teacher_path=tmp_path / "t.keras")


def test_compile_for_training_fits_every_kind_of_model():
    info = tr.data.info("fashion_mnist")
    network = multiexit.attach_exits(tr.models.small_cnn(width=4), ["relu_1"])
    tr.training.compile_for_training(network, keras.optimizers.Adam(1e-3))
    x, y = np.zeros((4, 28, 28, 1), "float32"), np.zeros(4, "int64")
    history = network.fit(x, (y, y), epochs=1, verbose=0)
    assert len([k for k in history.history if k.endswith("accuracy")]) == 2
    robust = stages.build_model(bench.ModelSpec(name="r", architecture="small_cnn", quantization="float",
                                                options={"width": 4},
                                                adversary={"method": "pgd", "epsilon": 0.05, "steps": 1}), info, 0)
    tr.training.compile_for_training(robust, keras.optimizers.Adam(1e-3))
    assert robust.loss is not None and "accuracy" not in robust.fit(x, y, epochs=1, verbose=0).history  # no clean pass


def test_the_stages_in_order_and_their_reuse(tmp_path):
    config = _experiment(tmp_path)
    spec, threat = config.models[0], config.threat_models["linf"]
    folder = RunFolder(tmp_path / "run")
    settings = runner.model_settings(config, folder)["m"]
    trained = stages.train_model(spec, config.train, config.dataset, config.seed, folder, settings, verbose=False)
    assert trained.seconds > 0 and folder.model("m").is_file() and folder.history("m").is_file()
    again = stages.train_model(spec, config.train, config.dataset, config.seed, folder, settings, verbose=False)
    assert again.seconds == 0.0  # loaded, not trained

    export_settings = fingerprints.export_settings(config.export, fingerprints.fingerprint(settings),
                                                   runner.versions())
    exported = stages.export_model(trained.model, spec, config.export, config.dataset, config.seed, folder,
                                   export_settings)
    assert exported.seconds > 0 and exported.shipped == folder.shipped("m") and exported.parity["examples"] == 16
    reused = stages.export_model(trained.model, spec, config.export, config.dataset, config.seed, folder,
                                 export_settings)
    assert reused.seconds == 0.0 and reused.parity == exported.parity
    folder.shipped("m").write_bytes(folder.shipped("m").read_bytes()[:-8])  # cut short: exported again
    with pytest.warns(UserWarning, match="not the file its parity record describes"):
        redone = stages.export_model(trained.model, spec, config.export, config.dataset, config.seed, folder,
                                     export_settings)
    assert redone.seconds > 0

    x, y = tr.data.load_arrays(config.dataset, "test", limit=threat.examples)
    attacked = tr.export.fold_quantized_weights(trained.model)
    evaluation = stages.evaluate(attacked, trained.model, x, y, threat, tr.data.info(config.dataset), config.seed)
    assert evaluation.examples == 16 and evaluation.cascade is not None  # the default suite, beside FGSM
    assert {"fgsm", "autoattack"} <= set(evaluation.report.accuracy()["attacks"])
    deployed = stages.evaluate_deployed(redone, attacked, evaluation.cascade, x, y, threat, config.export,
                                        (0.0, 1.0), config.seed)
    assert deployed["examples"] == 8 and set(deployed["robust_accuracy"]) == {"transfer", "square"}
    assert deployed["seconds_per_inference"] > 0 and deployed["compressed"]
    assert deployed["int8_seconds_per_inference"] > 0 and deployed["channel_groups"] == {}
    assert all(deployed["worst_case"][e] <= deployed["clean_accuracy"] for e in deployed["worst_case"])
    record, correct = stages.test_accuracy(attacked, x, y)
    assert record == {"accuracy": float(np.mean(correct)), "examples": 16}
