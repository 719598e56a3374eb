"""Run pytest with ``mpidl.algorithms`` as a bare package: its ``__init__`` (which imports every
family, and with them torch, to register them) is skipped, so a test file that needs one family's
modules starts in about 2 s instead of 8.  For mutation targets (scripts/mutation.sh), where the
start-up is paid once per mutant; the tests themselves are unchanged (a test that needs torch
imports it).

    python scripts/pytest_one_family.py -x -q tests/test_pdadmm_units.py
"""
import os
import sys
import types

import mpidl

pkg = types.ModuleType("mpidl.algorithms")
pkg.__path__ = [os.path.join(os.path.dirname(mpidl.__file__), "algorithms")]
sys.modules["mpidl.algorithms"] = pkg

import pytest  # noqa: E402

sys.exit(pytest.main(sys.argv[1:]))
