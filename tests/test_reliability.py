"""The reliability audit's kinds of cases, one place that keeps them: each once gave a wrong number with exit 0,
lost or reused the wrong artifact, or ended in a traceback. Each test names the old behaviour.

Cases that belong to one module stay in its own tests: calibration inputs on another scale and NaN inputs
(`test_export.py`), foreign and corrupt model files, checkpoints, `--fresh`, full disks and read-only folders
(`test_bench.py`), wrong-typed experiment tables (`test_bench.py::test_a_wrong_typed_table_is_named_at_load_in_any_
profile`).
"""

import json
import multiprocessing

import numpy as np
import pytest

import tinyrobust as tr
from tinyrobust import attacks, bench, export, files
from tinyrobust.bench import results as results_lib

from experiment_files import BASE, write as _write  # noqa: E402

# -- Settings typed where they are read ------------------------------------------------------------------------


def test_a_boolean_written_as_a_string_is_refused_not_true(tmp_path):
    # Once: `targeted = "no"` made a PGD targeted on the true labels (0% at every eps, no flag).
    with pytest.raises(ValueError, match=r"targeted.*Received: targeted='no'"):
        attacks.PGD(0.1, targeted="no")
    text = BASE.replace('fgsm = { type = "FGSM" }', 'pgd = { type = "PGD", steps = 2, targeted = "no" }')
    with pytest.raises(bench.ExperimentError, match="targeted"):
        bench.load(_write(tmp_path, text))


def test_an_attack_cannot_bring_its_own_norm_into_a_threat_model(tmp_path):
    # Once: `norm = "l2"` inside [threat_models.linf] ran an L2 attack reported as an L-inf column.
    text = BASE.replace('fgsm = { type = "FGSM" }', 'pgd = { type = "PGD", steps = 2, norm = "l2" }')
    with pytest.raises(bench.ExperimentError, match="norm"):
        bench.load(_write(tmp_path, text))


def test_an_epsilon_beyond_the_input_range_is_refused_in_python_too():
    # Once: `attacks.FGSM(8)` and `AdversarialTraining("pgd", epsilon=8)` on [0, 1] inputs were accepted.
    with pytest.raises(ValueError, match=r"eps.*Received: eps=8"):
        attacks.FGSM(8)
    with pytest.raises(ValueError, match=r"epsilon.*Received: epsilon=8"):
        tr.training.AdversarialTraining("pgd", epsilon=8)


def test_labels_beyond_the_models_classes_are_refused_by_score_and_decision_attacks():
    # Once: out-of-range labels made Square and HopSkipJump report success 1.0.
    model = tr.models.small_cnn(width=4)
    x = np.zeros((2, 28, 28, 1), "float32")
    for attack in (attacks.Square(0.1, queries=5), attacks.HopSkipJump(0.1, queries=200)):
        with pytest.raises(ValueError, match="label"):
            attack.run(model, x, np.array([3, 12]))


# -- Reuse only what is provably the same -----------------------------------------------------------------------


def test_an_inconsistent_result_is_named_and_not_reported(tmp_path):
    # Once: a hand-edited result (worst case above clean accuracy) was reported and reused as it was.
    with pytest.raises(ValueError, match="worst"):
        results_lib.validate({**_any_committed_result(), "worst_case": {"0.1": 1.0}, "clean_accuracy": 0.5})


def _any_committed_result():
    path = next(iter(sorted((bench.runner.pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results")
                            .glob("fashion_mnist_tiny_demo/results/*.json"))))
    return json.loads(path.read_text())


def test_a_truncated_tflite_file_is_named_in_one_line(tmp_path):
    # Once: a truncated `.tflite` gave `struct.error` on every rerun.
    path = tmp_path / "m.tflite"
    path.write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"Expected a TFLite flatbuffer.*m.tflite"):
        export.TFLiteModel(path)


# -- Nothing lost, nothing half-written -------------------------------------------------------------------------


def _hold_lock(folder, ready, release):
    with files.folder_lock(folder):
        ready.set()
        release.wait(30)


def test_a_held_lock_stops_a_second_run_and_a_dead_ones_does_not(tmp_path):
    # Once: a stale `.lock` could be taken by two processes at once, and a SIGTERM left it behind.
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    assert ready.wait(60)
    with pytest.raises(ValueError, match=r"Another run \(process \d+\)"):
        with files.folder_lock(tmp_path):
            pass
    holder.terminate()  # SIGTERM: the operating system drops its lock
    holder.join(30)
    with files.folder_lock(tmp_path):
        pass


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('name = "m"', 'name = "a-b"') + '\n[[models]]\nname = "a_b"\narchitecture = "small_cnn"\n'
     'quantization = "stq"\n', "export to the same files"),
    (lambda t: t.replace('name = "m"', f'name = "{"m" * 300}"'), "at most 100"),
    (lambda t: "seed = 4294967296\n" + t, r"Received: seed=4294967296"),
])
def test_names_and_seeds_that_fail_late_are_refused_at_load(tmp_path, edit, message):
    # Once: these failed only after earlier models had trained (or overwrote each other's files).
    with pytest.raises(bench.ExperimentError, match=message):
        bench.load(_write(tmp_path, edit(BASE)))
