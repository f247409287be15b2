"""Argument checks shared by every module: each raises a ValueError that names
the argument and the value received (`Received: name=value`)."""

import numpy as np

__all__ = ["check_bool", "check_choice", "check_labels", "check_number", "check_range"]


def check_number(name, value, low=None, high=None, low_open=False, high_open=False, integer=False):
    """Returns `value` if it is a finite number (a Python int when `integer`) within the bounds.

    Args:
        name: the argument's name, for the message.
        value: the value received.
        low, high: bounds, or None.
        low_open, high_open: exclude the bound itself.
        integer: require a Python int.

    Raises:
        ValueError: naming the argument and the value.
    """
    kinds = (int,) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and bool(np.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high}")
        bound = (" " + " and ".join(bounds)) if bounds else ""
        raise ValueError(f"Expected `{name}` to be a{'n integer' if integer else ' finite number'}{bound}. "
                         f"Received: {name}={value!r}")
    return value


def check_range(input_range, name="input_range"):
    """Returns `(low, high)` as floats with low < high."""
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError):
        low = high = None
    if low is None or not low < high:
        raise ValueError(f"Expected `{name}` to be (low, high) with low < high. Received: {name}={input_range!r}")
    return (low, high)


def check_bool(name, value):
    """Returns `value` if it is True or False (not a string such as "no", which `bool` would make True).

    Raises:
        ValueError: naming the argument and the value.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Expected `{name}` to be True or False. Received: {name}={value!r}")
    return bool(value)


def check_choice(name, value, allowed):
    """Returns `value` if it is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"Expected `{name}` to be one of {list(allowed)}. Received: {name}={value!r}")
    return value


def check_labels(y, n=None, num_classes=None, name="y"):
    """Integer class labels as an int32 array of shape (N,).

    Accepts shape (N,) or (N, 1) (as `keras.datasets` returns them), integer
    values of any dtype (floats only when they are whole numbers).

    Args:
        y: the labels.
        n: the number of labels expected (one per input), or None.
        num_classes: labels must lie in [0, num_classes) when given; else >= 0.
        name: the argument's name, for the message.

    Raises:
        ValueError: naming the argument and what was received.
    """
    labels = np.asarray(y)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"Expected `{name}` to hold one integer label per example, shape (N,) or (N, 1). "
                         f"Received: {name} with shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError(f"Expected `{name}` to hold integer class labels. Received: {name} with non-integer "
                             f"values such as {labels[~(labels == np.round(labels))][:3].tolist()}")
    elif labels.dtype.kind not in "iub":
        raise ValueError(f"Expected `{name}` to hold integer class labels. Received: {name} of dtype {labels.dtype}")
    if n is not None and len(labels) != n:
        raise ValueError(f"Expected one label per input ({n}). Received: {name} with {len(labels)} labels")
    high = num_classes if num_classes is not None else None
    if labels.size and (labels.min() < 0 or (high is not None and labels.max() >= high)):
        allowed = f"[0, {high})" if high is not None else ">= 0"
        raise ValueError(f"Expected `{name}` to be class labels in {allowed}. "
                         f"Received: {name} in [{labels.min()}, {labels.max()}]")
    return labels.astype("int32")
