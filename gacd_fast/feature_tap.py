"""FeatureTap: any classifier as a ``(features, logits)`` model, the interface GACD's teacher and
student have (``GACDLoss`` takes features, the attacks' ``"ce"`` loss the logits).

Users bring torchvision/timm/RobustBench-style models that return logits only. A forward hook on
one submodule keeps its output (or, by default, the input of the last ``nn.Linear``: the pooled
penultimate features) during the model's own forward; nothing in the model changes.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn


class FeatureTap(nn.Module):
    """Wraps ``model`` (images -> logits [B, C]) so that it returns ``(features [B, D], logits [B, C])``.

    Args:
        model: any ``nn.Module`` whose forward returns a logits tensor [B, C].
        layer: the dotted name of a submodule, as in ``model.named_modules()`` (e.g.
            ``"block3.layer.3.relu2"``), whose output is the features; None (default): the input
            of the last ``nn.Linear`` in ``model.modules()`` order (the classifier head of
            torchvision, timm and RobustBench models, whose input are the pooled features).

    The features are flattened to [B, D] (D = the product of the other dims) and keep their graph,
    so gradients flow through them (attacks, a student's loss). The hook is registered once, here;
    each forward hands its features from the hook to the caller, so the module works under the
    attacks, ``torch.compile`` and DDP (one module per process; not ``nn.DataParallel``, whose
    threads would share the hook's slot). ``feature_dim``: D, the last linear layer's
    ``in_features`` for ``layer=None``, otherwise None until :meth:`infer_feature_dim`.
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a submodule name (str) or None, got {type(layer).__name__}")
        self.model = model
        self.layer = layer
        modules = dict(model.named_modules())
        self.feature_dim: int | None = None
        if layer is None:
            linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"FeatureTap(layer=None) takes the input of the model's last nn.Linear, but "
                                 f"{type(model).__name__} has none: pass layer= the name of the submodule whose "
                                 f"output are the features (one of {_some(modules)})")
            name, head = linears[-1]
            self.tapped = name
            self.feature_dim = head.in_features
            head.register_forward_pre_hook(self._keep_input)
        else:
            if layer not in modules or layer == "":
                close = difflib.get_close_matches(layer, [n for n in modules if n], n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(f"FeatureTap: {type(model).__name__} has no submodule named {layer!r}{hint} "
                                 f"(names as in model.named_modules(), e.g. {_some(modules)})")
            self.tapped = layer
            modules[layer].register_forward_hook(self._keep_output)
        self._kept: list[torch.Tensor] = []
        self._recording = False  # only this module's forward records: a direct call of the model keeps nothing

    def _keep_input(self, module: nn.Module, args: tuple) -> None:
        if self._recording:
            self._kept.append(args[0])

    def _keep_output(self, module: nn.Module, args: tuple, output: object) -> None:
        if not self._recording:
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"FeatureTap: layer {self.tapped!r} returned {type(output).__name__}, not a tensor; "
                            "tap a submodule whose output is a tensor")
        self._kept.append(output)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._kept.clear()
        self._recording = True
        try:
            logits = self.model(x)
        finally:
            self._recording = False
        if not self._kept:
            raise RuntimeError(f"FeatureTap: layer {self.tapped!r} was not called in {type(self.model).__name__}'s "
                               "forward, so there are no features; tap a submodule the forward uses")
        features = self._kept[-1]  # a layer called several times in one forward (a shared block): its last call
        self._kept.clear()  # no reference to this call's graph stays behind
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise TypeError(f"FeatureTap needs a model that returns [B, C] logits, got {got}")
        return features.flatten(1), logits

    @torch.no_grad()
    def infer_feature_dim(self, example: torch.Tensor) -> int:
        """D of the features, from one forward of ``example`` [B, ...] in eval mode (every module's
        train/eval flag restored after); also sets ``feature_dim``."""
        flags = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            self.feature_dim = int(self(example)[0].shape[1])
        finally:
            for m, t in flags:
                m.training = t
        return self.feature_dim

    def extra_repr(self) -> str:
        return f"tapped={self.tapped!r}, feature_dim={self.feature_dim}"


def _some(modules: dict[str, nn.Module], k: int = 6) -> list[str]:
    """Up to ``k`` submodule names, the last ones (nearest the head), for error messages."""
    return [n for n in modules if n][-k:]
