"""Make ``gacd_fast.kernels`` and ``gacd_fast.csrc`` importable when running from a checkout
(PYTHONPATH=.), as setup.py's package_dir does for installs: they live in the repository's
top-level kernels/ (Triton kernels) and csrc/ (the C++/CUDA extension's sources) folders."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _map_package(name: str, folder: Path) -> None:
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    init = folder / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["gacd_fast"], name.rsplit(".", 1)[1], module)


def map_kernels_package() -> None:
    """Map kernels/ to gacd_fast.kernels and csrc/ to gacd_fast.csrc when they are not installed."""
    root = Path(__file__).resolve().parent.parent
    _map_package("gacd_fast.kernels", root / "kernels")
    _map_package("gacd_fast.csrc", root / "csrc")
