import os
import sys

import torch

# Without a GPU the Triton kernel runs under the interpreter; the flag must be
# set before the kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers.py
