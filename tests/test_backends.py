"""The backend registry: selection order, errors that name what is missing."""
import pytest
import torch

import gacd_fast
from gacd_fast import backends


def test_torch_always_available_and_default_auto(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert "torch" in gacd_fast.available_backends()
    assert gacd_fast.available_backends("cpu")[-1] == "torch"
    assert gacd_fast.get_backend() == "auto"
    name, _ = backends.resolve("info_nce_rows", torch.device("cpu"))
    assert name in gacd_fast.available_backends("cpu")


def test_set_backend_and_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert gacd_fast.get_backend() == "torch"
    gacd_fast.set_backend("auto")
    assert gacd_fast.get_backend() == "auto"  # set_backend wins over the environment
    gacd_fast.set_backend(None)
    assert gacd_fast.get_backend() == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="nope"):
        gacd_fast.get_backend()


def test_unknown_backend_errors_list_what_exists():
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*available here: \[.*'torch'"):
        gacd_fast.set_backend("fast")
    q = torch.randn(2, 3)
    with pytest.raises(ValueError, match="fast"):
        gacd_fast.info_nce(q, q, q, backend="fast")
    with pytest.raises(TypeError, match="backend"):
        gacd_fast.set_backend(3)


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    spec = backends.BackendSpec("broken", "gacd_fast.no_such_module", "test double")
    backends.register_backend(spec, priority=0)
    try:
        assert "broken" not in gacd_fast.available_backends()
        with pytest.raises(RuntimeError, match=r"broken.*no_such_module.*available"):
            gacd_fast.set_backend("broken")
        q = torch.randn(2, 3)
        with pytest.raises(RuntimeError, match="broken"):
            gacd_fast.info_nce(q, q, q, backend="broken")
        # "auto" passes over it quietly
        assert torch.isfinite(gacd_fast.info_nce(q, q, q, backend="auto"))
    finally:
        backends._SPECS.pop("broken")
        backends.AUTO_ORDER.remove("broken")
        backends._modules.pop("broken", None)


def test_per_call_backend_is_used(monkeypatch):
    calls = []
    mod = backends._load("torch")
    orig = mod.l2_normalize
    monkeypatch.setattr(mod, "l2_normalize", lambda x: calls.append(1) or orig(x))
    gacd_fast.l2_normalize(torch.randn(2, 3), backend="torch")
    assert calls == [1]
