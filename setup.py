"""Installs gacd_fast; this repository's kernels/ folder becomes the gacd_fast.kernels package."""
from setuptools import find_packages, setup

packages = find_packages(include=["gacd_fast", "gacd_fast.*"]) + ["gacd_fast.kernels"]

setup(
    name="gacd_fast",
    version="0.1.0",
    description="Fast, exact guided adversarial contrastive distillation (GACD) for PyTorch",
    packages=packages,
    package_dir={"gacd_fast.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.3"], "data": ["scikit-learn"]},
)
