import os
import sys

import torch
from hypothesis import HealthCheck, Phase, settings

# Without a GPU the Triton kernel runs under the interpreter; the flag must be
# set before the kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers.py

# Property tests (tests/test_properties.py). "ci", the default: few examples, drawn the same way
# on every run so a failure reproduces, reported as drawn (shrinking examples that take a second
# each can run for many minutes); HYPOTHESIS_PROFILE=long explores many more, freshly drawn, and
# shrinks a failure. No example database: no run depends on an earlier one (hypothesis still
# caches constants in .hypothesis/, which it git-ignores itself).
settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=150, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
