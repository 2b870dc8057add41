"""Hypothesis profiles for the property tests against `spec/`.

* ``fast`` (the default here): derandomized, so CI runs the same examples
  every time and a failure is never a fluke of the draw.
* ``thorough``: many more, longer, random runs; use it before a release or
  after touching `trioflow/core`::

      python -m pytest tests/properties -p no:randomly --hypothesis-profile=thorough

The profiles are applied to these tests only (`profile_settings`), so that
loading this directory does not change the settings of other suites.
"""

from hypothesis import settings

# The profiles themselves are registered in tests/conftest.py, which pytest
# loads before it applies --hypothesis-profile.


def profile_settings() -> settings:
    """The ``thorough`` profile if it was asked for, else ``fast``."""
    name = settings.get_current_profile_name()
    return settings.get_profile("thorough" if name == "thorough" else "fast")
