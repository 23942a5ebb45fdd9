"""Built-ins' own error behaviour. Bad input to any implementation is in the property suite,
attention/suite/test_bad_input.py."""

from __future__ import annotations

import re

import pytest

import attention


def test_a_plugin_declaring_supports_dropout_as_a_bool_attribute_still_works():
    class Legacy(attention.get("sdpa")):
        supports_dropout = False  # how capabilities were declared before they were class methods

    with pytest.raises(ValueError, match=re.escape("Legacy does not support dropout; got dropout=0.25")):
        Legacy(8, 8, 2, 8, dropout=0.25)
    assert Legacy(8, 8, 2, 8).dropout == 0.0
