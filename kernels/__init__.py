"""Triton kernels of gacd_fast, installed as ``gacd_fast.kernels`` (setup.py maps this folder).

Kernels know nothing of modules; the ``triton`` backend (gacd_fast/ops/triton_backend.py) launches them.
"""
