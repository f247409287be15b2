import keras
import numpy as np
import pytest

import tinyrobust as tr
from tinyrobust import distill, export

LOGITS_T = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], "float64")
LOGITS_S = np.array([[1.0, 1.0, 0.0], [0.5, -0.5, 2.0]], "float64")
LOGITS_ADV = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 0.5]], "float64")
LABELS = np.array([0, 2], "int32")


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _kl(t, s, temperature):
    p, q = _softmax(t / temperature), _softmax(s / temperature)
    return np.mean(np.sum(p * np.log(p / q), axis=1))


def _ce(s, y):
    return np.mean(-np.log(_softmax(s)[np.arange(len(y)), y]))


@pytest.mark.parametrize("method, temperature, alpha, expected", [
    ("kd", 4.0, 0.9, 0.9 * 16 * _kl(LOGITS_T, LOGITS_S, 4.0) + 0.1 * _ce(LOGITS_S, LABELS)),
    ("ard", 30.0, 0.7, 0.7 * 900 * _kl(LOGITS_T, LOGITS_ADV, 30.0) + 0.3 * _ce(LOGITS_S, LABELS)),
    ("rslad", 1.0, 5 / 6, 5 / 6 * _kl(LOGITS_T, LOGITS_ADV, 1.0) + 1 / 6 * _kl(LOGITS_T, LOGITS_S, 1.0)),
])
def test_losses_match_hand_computed_values(method, temperature, alpha, expected):
    loss, _, _ = distill.distillation_loss(method, LABELS, LOGITS_T, LOGITS_S, LOGITS_ADV, temperature, alpha)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_default_temperature_and_alpha_follow_the_papers():
    loss, distill_term, natural = distill.distillation_loss("ard", LABELS, LOGITS_T, LOGITS_S, LOGITS_ADV)
    np.testing.assert_allclose(float(distill_term), 900 * _kl(LOGITS_T, LOGITS_ADV, 30.0), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(distill_term), rtol=1e-6)  # ARD's alpha = 1
    np.testing.assert_allclose(float(natural), _ce(LOGITS_S, LABELS), rtol=1e-5)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 28, 28, 1)).astype("float32"), (np.arange(n) % 10).astype("int32")


def _teacher():
    keras.utils.set_random_seed(1)
    return tr.models.small_cnn(quantization="float", width=4)


@pytest.mark.parametrize("method", ["kd", "ard", "rslad"])
def test_each_method_trains_and_keeps_the_teacher_frozen(method):
    teacher = _teacher()
    frozen = [w.copy() for w in teacher.get_weights()]
    student = tr.models.small_cnn(quantization="stq", width=4)
    adversary = None if method == "kd" else tr.AdversarialTraining("pgd", epsilon=0.05, steps=2)
    model = distill.RobustDistiller(student, teacher, method=method, adversary=adversary)
    model.compile(optimizer="adam")
    x, y = _data()
    before = [w.copy() for w in student.get_weights()]
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    natural = "natural_kl" if method == "rslad" else "ce"
    if method == "ard":  # ARD's alpha=1 has no natural term: no clean student pass, so no clean accuracy
        assert {"loss", "distill"} <= set(logs) and not {natural, "accuracy"} & set(logs)
    else:
        assert {"loss", "distill", natural, "accuracy"} <= set(logs)
    assert ("adv_accuracy" in logs) == (method != "kd")
    assert all(np.isfinite(v[-1]) for v in logs.values())
    for a, b in zip(frozen, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(before, student.get_weights()))
    assert model.evaluate(x, y, verbose=0, return_dict=True).keys() >= {"loss", "accuracy"}


def test_cached_teacher_logits_train_like_the_live_teacher():
    teacher = _teacher()
    x, y = _data()
    weights = []
    for targets in (y, distill.with_teacher_logits(teacher, x, y)[1]):
        keras.utils.set_random_seed(2)
        model = distill.RobustDistiller(tr.models.small_cnn(quantization="float", width=4), teacher, method="kd")
        model.compile(optimizer="adam")
        model.fit(x, targets, batch_size=16, epochs=2, verbose=0, shuffle=False)
        weights.append(model.student.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_stq_student_with_jacobian_distils_saves_and_exports(tmp_path):
    teacher = _teacher()
    student = tr.RobustModel.wrap(tr.models.small_cnn(quantization="stq", width=4),
                                  jacobian=tr.JacobianRegularizer(layers={"input": 0.5}))
    model = distill.RobustDistiller(student, teacher, method="ard", alpha=0.5,
                                    adversary={"method": "fgsm_rs", "epsilon": 0.05})
    model.compile(optimizer="adam")
    x, y = _data()
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    # The Jacobian penalty is part of the loss: it exceeds the weighted distillation terms.
    assert logs["loss"][-1] > 0.5 * logs["distill"][-1] + 0.5 * logs["ce"][-1]
    model.save(tmp_path / "distiller.keras")
    loaded = keras.models.load_model(tmp_path / "distiller.keras")  # the RobustModel it trains, without teacher
    assert isinstance(loaded, tr.RobustModel) and loaded.objective.teacher is None
    assert (loaded.objective.method, loaded.objective.alpha, loaded.adversary.method) == ("ard", 0.5, "fgsm_rs")
    assert loaded.jacobian.get_config() == student.jacobian.get_config()
    np.testing.assert_allclose(loaded.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0), atol=1e-5)
    runner = export.TFLiteModel(export.to_tflite(model.student, tmp_path / "student.tflite", x[:32]))
    assert runner(x[:4]).shape == (4, 10)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "mse"}, "Received: method='mse'"),
    ({"alpha": 1.5}, "Received: alpha=1.5"),
    ({"temperature": 0}, "Received: temperature=0"),
    ({"method": "kd", "adversary": tr.AdversarialTraining()}, "Received: adversary="),
    ({"adversary": tr.AdversarialTraining("trades")}, "Received: adversary="),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distill.RobustDistiller(tr.models.small_cnn(width=4), _teacher(), **kwargs)


def test_student_must_differ_from_teacher():
    teacher = _teacher()
    with pytest.raises(ValueError, match="student is teacher"):
        distill.RobustDistiller(teacher, teacher, method="kd")


@pytest.mark.parametrize("method, training", [("ard", True), ("rslad", False)])
def test_each_method_attacks_the_student_in_the_mode_of_its_released_code(method, training):
    """ARD's code attacks with the student in training mode (batch statistics, moving statistics updated);
    RSLAD's calls `model.eval()` first. The other mode is an option."""
    student, teacher = tr.models.small_cnn(width=4, name="student"), _teacher()
    x, y = _data()
    moved = {}
    for attack_training in (None, not training):
        model = distill.RobustDistiller(student, teacher, method=method, attack_training=attack_training,
                                        adversary=tr.AdversarialTraining("pgd", epsilon=0.05, steps=2))
        assert model.objective.attack_training == (training if attack_training is None else attack_training)
        before = keras.ops.convert_to_numpy(student.get_layer("bn_1").moving_mean).copy()
        model.adversarial_examples(x, y)
        moved[attack_training] = not np.array_equal(before, keras.ops.convert_to_numpy(
            student.get_layer("bn_1").moving_mean))
    assert moved == {None: training, (not training): not training}
    config = distill.Distillation(method=method, attack_training=not training).get_config()
    assert distill.Distillation.from_config(config).attack_training == (not training)
    with pytest.raises(ValueError, match="Received: attack_training='yes'"):
        distill.Distillation(method=method, attack_training="yes")
