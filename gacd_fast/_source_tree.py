"""Make ``gacd_fast.kernels`` importable when running from a checkout (PYTHONPATH=.), as setup.py's
package_dir does for installs: the kernels live in the repository's top-level kernels/ folder."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def map_kernels_package() -> None:
    name = "gacd_fast.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    init = folder / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    sys.modules["gacd_fast"].kernels = module
