"""An independent pure-Python implementation of the randomness contract's 32-bit mix, for the
golden-value tests (tests/test_randomness.py, test_factor_randomness.py, test_sparse_projection.py).

Written from the contract's definition (docs/design.md, "The randomness contract"), not from
trakjax's code: the tests compare the two.
"""

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def py_mix(x: int) -> int:
    """The contract's 32-bit integer mix (xor-shift-multiply), on Python ints."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x
