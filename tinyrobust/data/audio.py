"""The MLPerf Tiny keyword-spotting front end: 1 s of 16 kHz audio to 49x10 MFCCs."""

import math

import numpy as np
import tensorflow as tf

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000
WINDOW_SAMPLES = 480  # 30 ms
STRIDE_SAMPLES = 320  # 20 ms
MEL_BINS = 40
MEL_LOW_HZ, MEL_HIGH_HZ = 20.0, 4000.0
NUM_MFCC = 10
LOG_FLOOR = 1e-6
FRAMES = 1 + (CLIP_SAMPLES - WINDOW_SAMPLES) // STRIDE_SAMPLES  # 49

# Speech Commands' 12 classes, in tfds' label order.
WORDS = ("down", "go", "left", "no", "off", "on", "right", "stop", "up", "yes")
LABELS = WORDS + ("_silence_", "_unknown_")

# |MFCC| bound: each log-mel value lies in [log(1e-6), log(1e6)] for samples in [-1, 1]
# (a mel energy never exceeds 1e6 with a 480-sample window), and the DCT-II that
# tf.signal applies scales a sum of MEL_BINS such values by 2 / sqrt(2 * MEL_BINS).
MFCC_BOUND = math.ceil(2 * MEL_BINS * -math.log(LOG_FLOOR) / math.sqrt(2 * MEL_BINS))


def fit_length(waveforms, length=CLIP_SAMPLES):
    """Zero-pads or crops the last axis of `waveforms` to `length` samples (crop keeps the start)."""
    waveforms = tf.convert_to_tensor(waveforms)
    waveforms = waveforms[..., :length]
    padding = length - tf.shape(waveforms)[-1]
    rank = waveforms.shape.rank
    return tf.pad(waveforms, [[0, 0]] * (rank - 1) + [[0, padding]])


def to_float(waveforms):
    """int16 samples as float32 in [-1, 1); float inputs are returned as float32."""
    waveforms = tf.convert_to_tensor(waveforms)
    if waveforms.dtype == tf.int16:
        return tf.cast(waveforms, tf.float32) / 32768.0
    return tf.cast(waveforms, tf.float32)


def mfcc(waveforms):
    """MLPerf Tiny KWS features of 1 s clips at 16 kHz.

    30 ms Hann windows every 20 ms (FFT 512), magnitude spectrum, 40 mel bins
    from 20 to 4000 Hz, log(mel + 1e-6), the first 10 MFCCs.

    Args:
        waveforms: (..., 16000) samples, int16 or float in [-1, 1]; other
            lengths are padded or cropped to 16000.

    Returns:
        float32 features of shape (..., 49, 10, 1), each within
        [-MFCC_BOUND, MFCC_BOUND].
    """
    signal = fit_length(to_float(waveforms))
    stft = tf.signal.stft(signal, frame_length=WINDOW_SAMPLES, frame_step=STRIDE_SAMPLES, fft_length=512)
    spectrogram = tf.abs(stft)
    mel_matrix = tf.signal.linear_to_mel_weight_matrix(
        MEL_BINS, spectrogram.shape[-1], SAMPLE_RATE, MEL_LOW_HZ, MEL_HIGH_HZ)
    mel = tf.tensordot(spectrogram, mel_matrix, 1)
    log_mel = tf.math.log(mel + LOG_FLOOR)
    features = tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[..., :NUM_MFCC]
    return features[..., tf.newaxis]


def mfcc_arrays(waveforms, batch_size=512):
    """`mfcc` of a numpy array of clips, computed in batches; returns numpy."""
    waveforms = np.asarray(waveforms)
    if len(waveforms) == 0:
        return np.zeros((0, FRAMES, NUM_MFCC, 1), np.float32)
    return np.concatenate([mfcc(waveforms[i:i + batch_size]).numpy() for i in range(0, len(waveforms), batch_size)])


def add_background_noise(waveforms, seed, probability=0.8, max_volume=0.1):
    """MLPerf-style augmentation: adds white noise of random volume to some clips.

    Args:
        waveforms: float32 (batch, samples) in [-1, 1].
        seed: a stateless seed, shape (2,) int.
        probability: chance that a clip gets noise.
        max_volume: largest noise standard deviation.

    Returns:
        The noisy clips, clipped to [-1, 1] as a recording would be.
    """
    shape = tf.shape(waveforms)
    seeds = tf.random.experimental.stateless_split(seed, 3)
    volume = tf.random.stateless_uniform([shape[0], 1], seeds[0], maxval=max_volume)
    apply = tf.cast(tf.random.stateless_uniform([shape[0], 1], seeds[1]) < probability, tf.float32)
    noise = tf.random.stateless_normal(shape, seeds[2])
    return tf.clip_by_value(waveforms + apply * volume * noise, -1.0, 1.0)
