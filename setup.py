"""Installs gacd_fast; this repository's kernels/ folder becomes the gacd_fast.kernels package and
csrc/ (the extension's C++/CUDA sources, shipped for the JIT build) becomes gacd_fast.csrc.

GACD_FAST_BUILD_EXT=1 also compiles the extension ahead of time as gacd_fast._C (needs torch
importable at build time: ``GACD_FAST_BUILD_EXT=1 pip install --no-build-isolation .``). The CUDA
sources are compiled only against a CUDA build of torch with a CUDA toolkit (CUDA_HOME, or the nvcc
on PATH).
"""
import glob
import os

from setuptools import find_packages, setup

packages = find_packages(include=["gacd_fast", "gacd_fast.*"]) + ["gacd_fast.kernels", "gacd_fast.csrc"]
SOURCE_DATA = ["*.h", "*.cpp", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]


def _nvcc_top():
    """The toolkit folder of the nvcc on PATH (it may be a wrapper script): nvcc --dryrun's TOP."""
    import re
    import shutil
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "p.cu")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", src + ".o"], capture_output=True, text=True)
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.normpath(m.group(1).strip()) if m else None


ext_kwargs = {}
if os.environ.get("GACD_FAST_BUILD_EXT", "") == "1":
    import torch
    from torch.utils import cpp_extension

    cxx_flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    cpp_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_home = None
    if torch.version.cuda is not None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _nvcc_top()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
            cpp_extension.CUDA_HOME = cuda_home  # guessed at import: None, or wrong for a wrapper nvcc
    if cuda_home:
        ext = cpp_extension.CUDAExtension(
            "gacd_fast._C",
            cpp_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    else:
        ext = cpp_extension.CppExtension("gacd_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})
    ext_kwargs = {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}

setup(
    name="gacd_fast",
    version="0.1.0",
    description="Fast, exact guided adversarial contrastive distillation (GACD) for PyTorch",
    packages=packages,
    package_dir={"gacd_fast.kernels": "kernels", "gacd_fast.csrc": "csrc"},
    package_data={"gacd_fast.csrc": SOURCE_DATA},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.3"], "data": ["scikit-learn"]},
    entry_points={"console_scripts": ["gacd-fast=gacd_fast.cli:main"]},
    **ext_kwargs,
)
