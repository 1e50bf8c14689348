#!/usr/bin/env python
"""Install the detection project as the package ``msgc_detection``.

From the repository root, after msgc itself (``pip install -e .``)::

    pip install -e projects/MSGCDetection

msgc is not on the package index, so it is not listed below (pip would look for it there): install it
first, from this repository.
"""
from setuptools import find_packages, setup

setup(
    name="msgc-detection",
    version="0.1.0",
    description="MSGC backbones in torchvision's Faster R-CNN and RetinaNet",
    python_requires=">=3.9",
    packages=find_packages(include=("msgc_detection", "msgc_detection.*")),
    install_requires=["pycocotools>=2.0.6"],
)
