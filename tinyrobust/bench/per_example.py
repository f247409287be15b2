"""Per-example correctness, kept compactly in result files so claims can be tested example by example.

A boolean vector (correct or not, one entry per example, in the order of the
examples the result measured) is stored as the hex string of `numpy.packbits`
with its length: 1,000 examples take 250 characters.
"""

import numpy as np

__all__ = ["pack", "unpack", "record"]


def pack(correct):
    """`{"n": len, "bits": hex}` of a boolean vector."""
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    return {"n": int(correct.size), "bits": np.packbits(correct).tobytes().hex()}


def unpack(packed):
    """The boolean vector of `pack`'s output.

    Raises:
        ValueError: a record whose bits do not hold `n` entries.
    """
    n, text = packed.get("n"), packed.get("bits")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or not isinstance(text, str):
        raise ValueError(f"Expected a per-example record {{'n': int, 'bits': hex}}. Received: {packed!r}")
    try:
        raw = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)
    except ValueError:
        raise ValueError(f"Expected hex digits in a per-example record. Received: bits={text[:40]!r}") from None
    if raw.size != (n + 7) // 8:
        raise ValueError(f"A per-example record of {n} entries needs {(n + 7) // 8} bytes. Received: {raw.size} bytes")
    return np.unpackbits(raw)[:n].astype(bool)


def record(clean, worst):
    """The `per_example` record of a result: clean and worst-case correctness (`{eps: bool array}`)."""
    return {"clean": pack(clean), "worst_case": {str(eps): pack(v) for eps, v in worst.items()}}
