"""The installed stack works when Python runs from the repository root.

Python puts the working directory first on ``sys.path``, so a top-level folder
of the repository that is an importable package shadows any installed
distribution of the same import name (a ``kernels/__init__.py`` here once broke
``import transformers``, which depends on PyPI's ``kernels``). These tests run
fresh interpreters from the root, as a user or ``python -m pytest`` does.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_from_root(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def is_in_folder(path: str, folder: str) -> bool:
    """Whether ``path`` lies in the repository's top-level ``folder`` (the virtual environment
    may sit inside the repository, so being under the root alone says nothing)."""
    return os.path.abspath(path).startswith(os.path.join(ROOT, folder) + os.sep)


def top_level_folders() -> list[str]:
    return sorted(d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and d.isidentifier())


def test_no_top_level_folder_is_a_regular_package_but_fast_dvla():
    # a folder with __init__.py beats any installed package of its name; fast_dvla is ours
    packages = [d for d in top_level_folders() if os.path.exists(os.path.join(ROOT, d, "__init__.py"))]
    assert packages == ["fast_dvla"]


def test_installed_distributions_resolve_outside_the_repository():
    installed = importlib.metadata.packages_distributions()  # import name -> distributions
    clashing = [d for d in top_level_folders() if d in installed and d != "fast_dvla"]
    code = ("import importlib, json, sys\n"
            f"names = {clashing!r}\n"
            "print(json.dumps({n: getattr(importlib.import_module(n), '__file__', None) for n in names}))")
    origins = json.loads(run_from_root(code))
    for name, origin in origins.items():
        assert origin is not None and not is_in_folder(origin, name), (name, origin)


def test_kernels_distribution_is_not_shadowed():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed here (transformers < 5.25 does not depend on it)")
    origin = run_from_root("import kernels; print(kernels.__file__)").strip()
    assert origin != "None" and not is_in_folder(origin, "kernels"), origin


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_transformers_models_build_from_the_root(family):
    code = (f"import torch\nfrom transformers import {family}Config, {family}Model\n"
            f"cfg = {family}Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, num_key_value_heads=1)\n"
            f"out = {family}Model(cfg)(input_ids=torch.zeros(1, 3, dtype=torch.long)).last_hidden_state\n"
            "print(tuple(out.shape))")
    assert run_from_root(code).strip() == "(1, 3, 16)"


def test_our_packages_and_command_from_the_root():
    code = ("import fast_dvla, fast_dvla_kernels, fast_dvla_eval, os\n"
            "print(all(os.path.exists(m.__file__) for m in (fast_dvla, fast_dvla_kernels, fast_dvla_eval)))\n"
            "print(callable(fast_dvla_kernels.triton_block_causal_attention))")
    assert run_from_root(code).split() == ["True", "True"]
