import json

import numpy as np
import pytest

from tinyrobust import data
from tinyrobust.data import fashion_mnist


def test_fashion_mnist_arrays():
    x, y = data.load_arrays("fashion_mnist", "test")
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))


def test_train_validation_disjoint_and_deterministic():
    train, _ = data.load_arrays("fashion_mnist", "train", seed=3)
    validation, _ = data.load_arrays("fashion_mnist", "validation", seed=3)
    assert len(train) + len(validation) == 60000 and len(validation) == 6000
    again, _ = data.load_arrays("fashion_mnist", "validation", seed=3)
    np.testing.assert_array_equal(validation, again)
    other, _ = data.load_arrays("fashion_mnist", "validation", seed=4)
    assert not np.array_equal(validation, other)


def test_dataset_batches_and_seeded_shuffle():
    first = [y.numpy() for _, y in data.load("fashion_mnist", "train", batch_size=50, limit=200, seed=1)]
    second = [y.numpy() for _, y in data.load("fashion_mnist", "train", batch_size=50, limit=200, seed=1)]
    assert [len(b) for b in first] == [50] * 4
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))


@pytest.mark.parametrize("name", ["fashion_mnist", "synthetic_kws"])
def test_each_pass_depends_only_on_the_seed_and_the_epoch_variable(name, request):
    import tensorflow as tf

    if name == "synthetic_kws":
        request.getfixturevalue("small_synthetic_kws")

    def one_pass(dataset):
        batches = list(dataset)
        return np.concatenate([x.numpy() for x, _ in batches]), np.concatenate([y.numpy() for _, y in batches])

    epoch = tf.Variable(0, dtype=tf.int64)
    dataset = data.load(name, "train", batch_size=16, limit=32, seed=1, augment=True, epoch=epoch)
    first, second = one_pass(dataset), one_pass(dataset)
    assert int(epoch.numpy()) == 2  # every pass reads the variable and advances it
    assert not np.array_equal(first[0], second[0])
    epoch.assign(1)  # a resumed run: a new dataset object, started at the second epoch
    resumed = one_pass(data.load(name, "train", batch_size=16, limit=32, seed=1, augment=True, epoch=epoch))
    np.testing.assert_array_equal(resumed[0], second[0])
    np.testing.assert_array_equal(resumed[1], second[1])
    with pytest.raises(ValueError, match="Received: epoch=3"):
        data.load(name, "train", epoch=3)


def test_calibration_set_from_train_split():
    x, indices = data.calibration_set("fashion_mnist", size=20, seed=2)
    train, _ = data.load_arrays("fashion_mnist", "train", seed=2)
    np.testing.assert_array_equal(x, train[indices])


def test_missing_files_say_where_we_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "search_paths", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fashion_mnist.read("train", allow_download=False)


def test_tinyrobust_data_env_is_searched(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYROBUST_DATA", str(tmp_path))
    assert fashion_mnist.search_paths()[0] == tmp_path / "fashion-mnist"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: data.info("mnist"), "Received: name='mnist'"),
        (lambda: data.load_arrays("fashion_mnist", "dev"), "Received: split='dev'"),
        (lambda: data.load("fashion_mnist", "train", batch_size=0), "Received: batch_size=0"),
        (lambda: data.load_arrays("fashion_mnist", "train", limit=-5), "Received: limit=-5"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture
def mock_tfds():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("name, shape", [("cifar10", (32, 32, 3)), ("svhn", (32, 32, 3))])
def test_tfds_image_sets_with_mock_data(mock_tfds, name, shape):
    x, y = data.load_arrays(name, "test")
    assert x.shape == (24,) + shape and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) <= set(range(10)) and y.dtype == np.int32
    assert data.info(name).input_shape == shape and data.info(name).num_classes == 10
    train, _ = data.load_arrays(name, "train", validation_fraction=0.25)
    validation, _ = data.load_arrays(name, "validation", validation_fraction=0.25)
    assert len(train) == 18 and len(validation) == 6
    batches = list(data.load(name, "train", batch_size=8, augment=True, seed=1))
    assert [tuple(b[0].shape) for b in batches] == [(8,) + shape] * 2 + [(6,) + shape]  # 22 train examples
    again = list(data.load(name, "train", batch_size=8, augment=True, seed=1))
    np.testing.assert_array_equal(batches[0][0], again[0][0])


def test_speech_commands_with_mock_data(mock_tfds):
    x, y = data.load_arrays("speech_commands", "validation")
    assert x.shape == (24, 49, 10, 1) and x.dtype == np.float32
    low, high = data.info("speech_commands").input_range
    assert low <= x.min() and x.max() <= high
    assert set(np.unique(y)) <= set(range(12)) and data.info("speech_commands").num_classes == 12
    assert data.info("speech_commands").class_names[-2:] == ("_silence_", "_unknown_")
    (xb, yb), = list(data.load("speech_commands", "train", batch_size=24, augment=True))
    assert xb.shape == (24, 49, 10, 1)


def test_mfcc_front_end_shape_and_bound():
    from tinyrobust.data import audio

    rng = np.random.default_rng(0)
    clips = (rng.uniform(-1, 1, (2, 16000)) * 32767).astype(np.int16)
    assert audio.mfcc(clips).shape == (2, 49, 10, 1)
    short = audio.mfcc(np.zeros((1, 9000), np.float32))
    assert short.shape == (1, 49, 10, 1)
    loud = audio.mfcc(np.sign(rng.normal(size=(1, 16000))).astype(np.float32)).numpy()
    silent = short.numpy()
    assert np.abs(loud).max() <= audio.MFCC_BOUND and np.abs(silent).max() <= audio.MFCC_BOUND
    # The first coefficient tracks loudness.
    assert loud[..., 0, 0].mean() > silent[..., 0, 0].mean() + 50


@pytest.fixture
def small_synthetic_kws(monkeypatch, tmp_path):
    from tinyrobust.data import synthetic_kws

    monkeypatch.setenv("TINYROBUST_DATA", str(tmp_path))
    monkeypatch.setattr(synthetic_kws.read, "__defaults__", (synthetic_kws.Config(4, 2, 0),))
    return tmp_path / "synthetic_kws" / synthetic_kws.Config(4, 2, 0).key()


def test_synthetic_kws_generates_once_and_checks_its_cache(small_synthetic_kws):
    from tinyrobust.data import synthetic_kws

    x, y = data.load_arrays("synthetic_kws", "test")
    assert x.shape == (24, 49, 10, 1) and sorted(np.bincount(y)) == [2] * 12
    assert len(set(y[:12])) > 6  # shuffled: the first examples are not a few classes (clips are made class by class)
    manifest = json.loads((small_synthetic_kws / "manifest.json").read_text())
    assert len(manifest["clips"]) == 12 * 6 and manifest["labels"][0] == "down"
    speakers = {c.get("variant", c.get("voice")) for c in manifest["clips"] if c["split"] == "test" and "voice" in c}
    assert speakers <= set(synthetic_kws.TEST_VARIANTS + synthetic_kws.TEST_FLITE_VOICES)
    # Training utterances are warped, test ones are as the synthesisers speak them.
    warps = [c.get("warp") for c in manifest["clips"] if c["engine"] != "none"]
    splits = [c["split"] for c in manifest["clips"] if c["engine"] != "none"]
    low, high = synthetic_kws.WARP
    assert all(low <= w <= high for w, s in zip(warps, splits) if s == "train")
    assert all(w is None for w, s in zip(warps, splits) if s == "test") and len(set(warps)) > 10
    stamp = (small_synthetic_kws / "clips.npz").stat().st_mtime_ns
    train, _ = data.load_arrays("synthetic_kws", "train", validation_fraction=0.0)
    assert len(train) == 48 and (small_synthetic_kws / "clips.npz").stat().st_mtime_ns == stamp
    # Words are audible: a word clip is louder than silence on average.
    raw, labels = data.load_raw("synthetic_kws", "train", validation_fraction=0.0)
    rms = np.sqrt(np.mean(raw.astype(np.float64) ** 2, axis=1))
    assert rms[labels < 10].mean() > rms[labels == 10].mean()
    # A corrupted archive fails its checksum and is regenerated identically.
    with open(small_synthetic_kws / "clips.npz", "ab") as f:
        f.write(b"garbage")
    assert not synthetic_kws.is_valid(small_synthetic_kws)
    x_again, _ = data.load_arrays("synthetic_kws", "test")
    np.testing.assert_array_equal(x_again, x)


def test_synthetic_kws_holds_out_speakers_whose_gender_training_covers():
    from tinyrobust.data import synthetic_kws

    engines = {"espeak-ng": (synthetic_kws.ESPEAK_VARIANTS, synthetic_kws.TEST_VARIANTS),
               "flite": (synthetic_kws.FLITE_VOICES, synthetic_kws.TEST_FLITE_VOICES)}
    for engine, (speakers, held_out) in engines.items():
        train = [s for s in speakers if s not in held_out]
        assert set(held_out) <= set(speakers) and train, engine
        trained_genders = {synthetic_kws.GENDERS[s] for s in train}
        assert {synthetic_kws.GENDERS[s] for s in held_out} <= trained_genders, engine


def test_calibration_set_records_indices_for_audio(small_synthetic_kws):
    x, indices = data.calibration_set("synthetic_kws", size=5, seed=1)
    train, _ = data.load_arrays("synthetic_kws", "train", seed=1)
    np.testing.assert_allclose(x, train[indices], atol=1e-5)


def test_image_augmentation_is_seeded_and_changes_each_epoch():
    dataset = data.load("fashion_mnist", "train", batch_size=16, limit=16, augment=True, shuffle=False, seed=3)
    first, second = [next(iter(dataset))[0].numpy() for _ in range(2)]
    plain = next(iter(data.load("fashion_mnist", "train", batch_size=16, limit=16, shuffle=False)))[0].numpy()
    assert not np.array_equal(first, plain) and not np.array_equal(first, second)
    again = next(iter(data.load("fashion_mnist", "train", batch_size=16, limit=16, augment=True, shuffle=False,
                                seed=3)))[0].numpy()
    np.testing.assert_array_equal(first, again)
    assert 0.0 <= first.min() and first.max() <= 1.0


def test_a_limit_beyond_the_split_is_refused_naming_the_carve_out():
    with pytest.raises(ValueError, match=r"holds 54,000 examples \(the training data less the 10% held out as "
                                         r"'validation'\)\. Received: limit=100000"):
        data.load_arrays("fashion_mnist", "train", limit=100000)


def test_load_data_gives_the_keras_datasets_layout():
    (x_train, y_train), (x_test, y_test) = data.load_data("fashion_mnist")
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert y_train.shape == (60000,) and x_train.dtype == "float32" and 0 <= x_train.min() <= x_train.max() <= 1
    (held, _), _ = data.load_data("fashion_mnist", validation_fraction=0.1)
    assert len(held) == 54000
