"""C++ (cpu/) and CUDA (cuda/) sources of the gacd_fast extension, shipped as package data.

Installed as ``gacd_fast.csrc`` (setup.py maps this folder, like kernels/); the cext backend
(gacd_fast/ops/cext_backend.py) compiles them JIT with ninja, or setup.py ahead of time with
``GACD_FAST_BUILD_EXT=1``. Nothing here is Python code.
"""
