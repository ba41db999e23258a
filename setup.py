"""Builds mace_kernels (with its C++ CPU extension) and mace.

    pip install --no-build-isolation -e .      # after torch is installed: the build needs its headers

Set MACE_KERNELS_NO_EXTENSION=1 to skip the C++ extension (the torch and triton backends serve).
"""

import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
if os.environ.get("MACE_KERNELS_NO_EXTENSION", "0") in ("", "0"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "mace_kernels._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    name="mace-kernels",
    version="0.1.0",
    description="Fast closed-form and multi-LoRA kernels for MACE concept erasure in diffusion models",
    packages=find_packages(include=["mace_kernels", "mace_kernels.*", "mace", "mace.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4", "numpy", "diffusers>=0.32", "transformers>=4.45", "peft>=0.13", "accelerate",
        "safetensors", "omegaconf", "tqdm", "ftfy", "torchmetrics>=1.4",
    ],
    package_data={"mace.world": ["weights*/*/*.json", "weights*/*/*.safetensors", "weights*/*.json"]},
    entry_points={"console_scripts": ["mace=mace.cli:main"]},
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "scipy"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
