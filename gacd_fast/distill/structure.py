"""Structure of a representation beside linear CKA: how far a student keeps the teacher's
neighbourhoods, the relational structure a contrastive objective is built to transfer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

KNN_K = 10


def knn_agreement(x: torch.Tensor, y: torch.Tensor, k: int = KNN_K) -> float:
    """Mean over samples of |N_x(i) & N_y(i)| / k, where N_x(i) are the ``k`` nearest other samples
    of sample i by cosine similarity of the rows of X [N, D1] (and N_y(i) of Y [N, D2]), in float64.
    1 when both spaces rank every sample's neighbours alike; about k / (N - 1) for unrelated ones.
    NaN in either input gives NaN. Needs N > k."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"knn_agreement needs X [N, D1] and Y [N, D2] with the same N, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"knn_agreement needs 1 <= k < N = {n}, got k={k}")
    if bool(torch.isnan(x).any()) or bool(torch.isnan(y).any()):
        return float("nan")
    hits = torch.ones(n, n, dtype=torch.bool)
    for z in (x, y):
        z = F.normalize(z.detach().double().cpu(), dim=1)
        sim = (z @ z.T).fill_diagonal_(float("-inf"))  # a sample is not its own neighbour
        mine = torch.zeros(n, n, dtype=torch.bool)
        mine.scatter_(1, sim.topk(k, dim=1).indices, True)
        hits &= mine
    return float(hits.sum(1).double().mean() / k)
