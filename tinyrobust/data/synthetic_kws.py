"""Spoken keywords synthesised offline with Debian's espeak-ng and flite voices.

A Speech-Commands-shaped data set: the same 12 classes (10 words, silence,
unknown), 1 s clips at 16 kHz, int16. Each clip varies the synthesiser and
voice, speaking speed, pitch, gain, position in the clip and background noise;
training clips are also warped (pitch and formants shifted together). Test
speakers are voices that training never hears.
Clips are generated once into a cache folder holding `clips.npz` and a
`manifest.json` with every clip's parameters and the archive's SHA-256;
a cache whose checksum does not match is regenerated.
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import wave

import numpy as np

from tinyrobust import files
from tinyrobust.data.audio import CLIP_SAMPLES, LABELS, SAMPLE_RATE

# Version 2: 500 train / 100 test clips per class (was 200 / 50), the Caribbean espeak voice, and flite's
# held-out voice is `rms` instead of `slt`, the only female flite voice: version 1 held out a gender its
# engine never spoke in training, and the float DS-CNN got 28.6% on those clips against 90.5% on the
# unseen espeak variants.
# Version 3: training utterances are warped (resampled by a factor in [0.85, 1.18], which moves pitch and
# formants together as a shorter or longer vocal tract does) so that a handful of synthetic speakers stand
# for many; test utterances are left as the synthesisers speak them.
VERSION = 3
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine", "one",
                 "seven", "sheila", "six", "three", "tree", "two", "wow", "zero")
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "klatt", "klatt3")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
# Gender of each voice variant and flite voice ("-": neither, e.g. espeak's croak and klatt voices).
GENDERS = {**{v: v[0].upper() if v[0] in "mf" and v[1:].isdigit() else "-" for v in ESPEAK_VARIANTS},
           "kal": "M", "kal16": "M", "awb": "M", "rms": "M", "slt": "F"}
# Speakers are split by voice variant, so that test speakers are unseen in training; each engine's
# training speakers include every gender of its test speakers.
TEST_VARIANTS = ("m7", "f5", "klatt3")
TEST_FLITE_VOICES = ("rms",)
SPLITS = ("train", "test")
# Range of the vocal-tract warp of training utterances (1: as synthesised).
WARP = (0.85, 1.18)


@dataclasses.dataclass(frozen=True)
class Config:
    """How many clips to make.

    Attributes:
        train_per_class: clips per class in the train split.
        test_per_class: clips per class in the test split.
        seed: seed of every random choice.
    """

    train_per_class: int = 500
    test_per_class: int = 100
    seed: int = 0

    def key(self):
        """Folder name of this configuration's cache."""
        return f"v{VERSION}-train{self.train_per_class}-test{self.test_per_class}-seed{self.seed}"


def cache_root():
    """`$TINYROBUST_DATA/synthetic_kws`, else `~/.cache/tinyrobust/synthetic_kws`."""
    if os.environ.get("TINYROBUST_DATA"):
        return pathlib.Path(os.environ["TINYROBUST_DATA"]) / "synthetic_kws"
    return pathlib.Path.home() / ".cache" / "tinyrobust" / "synthetic_kws"


def check_synthesisers():
    """Raises FileNotFoundError naming the missing programs and the Debian packages."""
    missing = [p for p in ("espeak-ng", "flite") if shutil.which(p) is None]
    if missing:
        raise FileNotFoundError(
            f"synthetic_kws needs {' and '.join(missing)} on PATH (Debian packages: apt-get install espeak-ng flite)."
        )


def _read_wav(data):
    with wave.open(io.BytesIO(data)) as w:
        rate, width = w.getframerate(), w.getsampwidth()
        frames = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"Expected 16-bit audio from the synthesiser. Received: sample width {width}")
    return np.frombuffer(frames, np.int16).astype(np.float32) / 32768.0, rate


def _resample(signal, rate):
    """Resamples to 16 kHz: windowed-sinc low-pass at the lower Nyquist, then linear interpolation."""
    if rate == SAMPLE_RATE:
        return signal
    cutoff = 0.5 * min(rate, SAMPLE_RATE) / rate * 0.9
    taps = np.arange(-32, 33)
    kernel = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hamming(len(taps))
    filtered = np.convolve(signal, kernel / kernel.sum(), mode="same")
    times = np.arange(int(len(signal) * SAMPLE_RATE / rate)) * rate / SAMPLE_RATE
    return np.interp(times, np.arange(len(signal)), filtered).astype(np.float32)


def _synthesise(params):
    """One utterance as float32 samples at 16 kHz."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.wav")
        if params["engine"] == "espeak-ng":
            command = ["espeak-ng", "-v", f"{params['voice']}+{params['variant']}", "-s", str(params["speed"]),
                       "-p", str(params["pitch"]), "-w", path, params["word"]]
        else:
            command = ["flite", "-voice", params["voice"], "--setf", f"duration_stretch={params['stretch']:.3f}",
                       "--setf", f"int_f0_target_mean={params['pitch']}", "-t", params["word"], "-o", path]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        signal, rate = _read_wav(pathlib.Path(path).read_bytes())
    # Played back `warp` times faster: pitch and formants move up by `warp`, the duration down.
    return _resample(signal, rate * params.get("warp", 1.0))


def _clip_parameters(rng, label, split):
    word = rng.choice(UNKNOWN_WORDS) if label == "_unknown_" else label
    test = split == "test"
    params = {"label": label, "word": str(word), "gain": float(rng.uniform(0.3, 0.9)),
              "noise": float(rng.uniform(0.0, 0.05)), "offset": float(rng.uniform(0, 1))}
    if label == "_silence_":
        params.update(engine="none", noise=float(rng.uniform(0.002, 0.1)), noise_color=str(rng.choice(["white", "brown"])))
        return params
    if rng.uniform() < 0.7:
        variants = TEST_VARIANTS if test else tuple(v for v in ESPEAK_VARIANTS if v not in TEST_VARIANTS)
        params.update(engine="espeak-ng", voice=str(rng.choice(ESPEAK_VOICES)), variant=str(rng.choice(variants)),
                      speed=int(rng.integers(110, 220)), pitch=int(rng.integers(15, 85)))
    else:
        voices = TEST_FLITE_VOICES if test else tuple(v for v in FLITE_VOICES if v not in TEST_FLITE_VOICES)
        params.update(engine="flite", voice=str(rng.choice(voices)), stretch=float(rng.uniform(0.8, 1.4)),
                      pitch=int(rng.integers(80, 200)))
    if not test:
        params["warp"] = float(rng.uniform(*WARP))
    return params


def _noise(rng, color, n):
    white = rng.normal(size=n)
    if color == "brown":
        walk = np.cumsum(white)
        walk -= np.convolve(walk, np.ones(401) / 401, mode="same")
        return walk / (np.std(walk) + 1e-9)
    return white


def _render(params, seed):
    """The 1 s int16 clip of one parameter set (deterministic given `seed`)."""
    rng = np.random.default_rng(seed)
    clip = np.zeros(CLIP_SAMPLES, np.float32)
    if params["engine"] != "none":
        speech = _synthesise(params)
        speech = speech[np.flatnonzero(np.abs(speech) > 0.01).min():] if np.any(np.abs(speech) > 0.01) else speech
        speech = speech[:CLIP_SAMPLES]
        peak = np.max(np.abs(speech)) or 1.0
        start = int(params["offset"] * (CLIP_SAMPLES - len(speech)))
        clip[start:start + len(speech)] = speech / peak * params["gain"]
    clip += params["noise"] * _noise(rng, params.get("noise_color", "white"), CLIP_SAMPLES)
    return (np.clip(clip, -1.0, 32767 / 32768) * 32768).astype(np.int16)


def generate(folder, config=Config(), workers=4):
    """Generates the data set into `folder` (clips.npz + manifest.json).

    Args:
        folder: output folder (created).
        config: a `Config`.
        workers: synthesiser processes run in parallel.

    Returns:
        The folder as a `pathlib.Path`.
    """
    check_synthesisers()
    rng = np.random.default_rng(config.seed)
    jobs = []
    for split, per_class in zip(SPLITS, (config.train_per_class, config.test_per_class)):
        for label in LABELS:
            for _ in range(per_class):
                jobs.append((split, _clip_parameters(rng, label, split), int(rng.integers(2**31))))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        clips = list(pool.map(lambda job: _render(job[1], job[2]), jobs))
    folder = pathlib.Path(folder)
    archive = folder / "clips.npz"
    with files.atomic_path(archive) as partial:
        np.savez_compressed(
            partial,
            waveforms=np.stack(clips),
            labels=np.array([LABELS.index(p["label"]) for _, p, _ in jobs], np.int32),
            splits=np.array([s for s, _, _ in jobs]),
        )
    manifest = {"version": VERSION, "config": dataclasses.asdict(config), "labels": list(LABELS),
                "sample_rate": SAMPLE_RATE, "sha256": _sha256(archive),
                "clips": [{"split": s, "seed": seed, **p} for s, p, seed in jobs]}
    files.write_json(folder / "manifest.json", manifest, indent=1)
    return folder


def _sha256(path):
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def is_valid(folder):
    """True when `folder` holds clips.npz and a manifest whose checksum matches it."""
    folder = pathlib.Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (folder / "clips.npz").is_file() and manifest.get("sha256") == _sha256(folder / "clips.npz")


def read(split, config=Config()):
    """Waveforms and labels of a split, generating the cache on first use.

    Args:
        split: "train" or "test".
        config: a `Config`.

    Returns:
        `(waveforms, labels)`: int16 (N, 16000) and int32 (N,), in a fixed
        shuffled order (clips are generated class by class; the first N of a
        split must not all be of a few classes).
    """
    if split not in SPLITS:
        raise ValueError(f"Expected split 'train' or 'test'. Received: split={split!r}")
    folder = cache_root() / config.key()
    if not is_valid(folder):
        generate(folder, config)
    with np.load(folder / "clips.npz") as archive:
        keep = np.flatnonzero(archive["splits"] == split)
        order = keep[np.random.default_rng([config.seed, SPLITS.index(split)]).permutation(len(keep))]
        return archive["waveforms"][order], archive["labels"][order]
