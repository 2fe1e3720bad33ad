"""LeNet-5 trained on scikit-learn's bundled 8x8 digits, upsampled to 32x32 (seeded; seconds on 2 cores)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .nets import LeNet5

SEED = 0
EPOCHS = 30
MEAN, STD = 0.5, 0.5


def digits_32() -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 32, 32) float32 in [0, 1] (light ink on dark, as the data set is), labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.numpy(), d.target.astype(np.int64)


def split(seed: int = SEED):
    from sklearn.model_selection import train_test_split

    x, y = digits_32()
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def normalize(x: np.ndarray) -> np.ndarray:
    return ((x - MEAN) / STD).astype(np.float32)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine moves (shift, scale, rotation) so served digits need not be centred exactly."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) - 0.5) * (2 * np.pi / 18)  # +-10 degrees
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.25
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def train(epochs: int = EPOCHS, seed: int = SEED) -> tuple[LeNet5, float, np.ndarray, np.ndarray]:
    """Returns the eval-mode model, held-out accuracy, and the held-out inputs (normalised) and labels.

    One thread: a net this small gains nothing from two, and loses a lot when the cores are busy.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(epochs: int, seed: int) -> tuple[LeNet5, float, np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xtr, xte, ytr, yte = split(seed)
    model = LeNet5()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            xb = (_augment(xt[idx], gen) - MEAN) / STD
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    xte_n = normalize(xte)
    with torch.inference_mode():
        pred = model(torch.from_numpy(xte_n)).argmax(1).numpy()
    return model, float((pred == yte).mean()), xte_n, yte
