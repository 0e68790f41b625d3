"""Every parser and decoder of outside input, fuzzed for a few seconds each: it returns,
or raises only its typed error (which the CLI turns into a clear message). Longer runs:
``python3 bench/fuzz.py``."""

from __future__ import annotations

import pytest

from fuzzing import Target, fuzz, targets


@pytest.mark.parametrize("target", targets(), ids=lambda t: t.name)
def test_fuzzed_input_gives_a_value_or_a_typed_error(target: Target) -> None:
    result = fuzz(target, 300)
    assert result.crash is None, result.crash
    assert result.inputs >= 100


def test_the_fuzzer_finds_an_untyped_error() -> None:
    """It can fail: a decoder that raises on some inputs is caught."""

    def fragile(data: bytes) -> None:
        if len(data) > 3 and data[0] % 4 == 1:
            raise IndexError("a bug")

    from hypothesis import strategies as st

    result = fuzz(Target("fragile", st.binary(max_size=16), fragile, ()), 300)
    assert result.crash is not None and "IndexError" in result.crash
