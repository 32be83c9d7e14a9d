"""The README's "Adding a mixer" example runs as written."""

import pathlib
import re

import pytest

from layers import mixers

README = pathlib.Path(__file__).parent.parent / "README.md"


def adding_a_mixer_example() -> str:
  section = README.read_text().split("### Adding a mixer", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def scratch_registry():
  """The example registers a mixer; other tests must not see it."""
  mixers.names()  # loads every mixer module before the snapshot
  saved = dict(mixers.REGISTRY._entries)
  yield
  mixers.REGISTRY._entries.clear()
  mixers.REGISTRY._entries.update(saved)


def test_adding_a_mixer_example_registers_and_passes_the_contract(
    scratch_registry):
  code = adding_a_mixer_example()
  assert "@mixers.register(" in code and "CHECKS" in code
  exec(compile(code, "README.md", "exec"), {})
  assert "gated_conv" in mixers.names()
