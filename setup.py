#!/usr/bin/env python
"""Install msgc: ``pip install -e .`` (add ``[detection]`` for the detection project, ``[vis]`` for figures,
``[bench]`` for the runtimes ``tools/benchmark.py --compare-dense`` compares with)."""
from setuptools import find_packages, setup

setup(
    name="msgc",
    version="0.1.0",
    description="Middle Spectrum Grouped Convolution: a research framework on PyTorch",
    python_requires=">=3.9",
    packages=find_packages(exclude=("tests", "configs", "tools", "projects")),
    # the deployed networks' C kernels, compiled on first use (msgc/deploy/native.py)
    package_data={"msgc.deploy": ["csrc/*.c", "csrc/*.h", "README.md"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        # fvcore and iopath are frozen since 2022; these versions are tested with torch 2.14.
        "fvcore==0.1.5.post20221221",
        "iopath==0.1.10",
        "yacs>=0.1.8",
        "tabulate>=0.9",
        "tensorboard>=2.10",
        "scikit-learn>=1.0",  # ships the real 8x8 digits used by the quickstart
        "numpy",
        "pillow",
        "pyyaml",
    ],
    extras_require={
        "detection": ["pycocotools>=2.0.6"],
        # figures: tools/visualize_gates.py, tools/plot_metrics.py, tools/spectrum_study.py
        "vis": ["matplotlib>=3.5"],
        # the dense host in the runtimes users deploy with: tools/benchmark.py --compare-dense (msgc.deploy.runtimes);
        # never needed by the package or its tests (they skip what needs them)
        "bench": ["onnxruntime>=1.16", "openvino>=2024.0", "onnx>=1.15"],
        # the tests, and the linter .ci/run runs after them (ruff.toml)
        "dev": ["pytest>=7", "pytest-xdist>=3", "pycocotools>=2.0.6", "matplotlib>=3.5", "ruff>=0.5"],
    },
)
