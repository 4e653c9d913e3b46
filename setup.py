"""What the install needs beyond pyproject.toml's metadata: this repository's kernels/ folder becomes
the gacd_fast.kernels package and csrc/ (the extension's C++/CUDA sources, shipped for the JIT
build) becomes gacd_fast.csrc.

GACD_FAST_BUILD_EXT=1 also compiles the extension ahead of time as gacd_fast._C (needs torch
importable at build time: ``GACD_FAST_BUILD_EXT=1 pip install --no-build-isolation .``). The CUDA
sources are compiled only against a CUDA build of torch with a CUDA toolkit (CUDA_HOME, or the nvcc
on PATH).
"""
import os

from setuptools import find_packages, setup

packages = find_packages(include=["gacd_fast", "gacd_fast.*"]) + ["gacd_fast.kernels", "gacd_fast.csrc"]
SOURCE_DATA = ["*.h", "*.cpp", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]


ext_kwargs = {}
if os.environ.get("GACD_FAST_BUILD_EXT", "") == "1":
    import sys

    import torch
    from torch.utils import cpp_extension

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gacd_fast.ops import cext_build  # one place for the flags and the toolkit lookup

    with_cuda = cext_build.builds_cuda()
    if with_cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cext_build.find_cuda_home()
    sources = [os.path.relpath(f) for f in cext_build.sources(with_cuda)]
    args = {"extra_compile_args": {"cxx": cext_build.CXX_FLAGS, "nvcc": cext_build.CUDA_FLAGS},
            "extra_link_args": cext_build.LD_FLAGS}
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext_kwargs = {"ext_modules": [make("gacd_fast._C", sources, **args)],
                  "cmdclass": {"build_ext": cpp_extension.BuildExtension}}

setup(
    packages=packages,
    package_dir={"gacd_fast.kernels": "kernels", "gacd_fast.csrc": "csrc"},
    package_data={"gacd_fast.csrc": SOURCE_DATA},
    **ext_kwargs,
)
