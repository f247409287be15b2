"""Argument checks shared by every module: each raises a ValueError that names
the argument and the value received (`Received: name=value`)."""

import numpy as np

__all__ = ["check_number", "check_range", "check_choice"]


def check_number(name, value, low=None, high=None, low_open=False, high_open=False, integer=False):
    """Returns `value` if it is a number (a Python int when `integer`) within the bounds.

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
    ok = isinstance(value, kinds) and not isinstance(value, bool)
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
        raise ValueError(f"Expected `{name}` to be a{'n integer' if integer else ' number'}{bound}. "
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


def check_choice(name, value, allowed):
    """Returns `value` if it is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"Expected `{name}` to be one of {list(allowed)}. Received: {name}={value!r}")
    return value
