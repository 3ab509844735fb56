"""Helpers shared by the tests."""

import pytest

# Asserts in these helpers get pytest's detailed failure messages, as in a test module.
pytest.register_assert_rewrite("tests.support.events")
