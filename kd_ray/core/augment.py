"""Image augmentation: the paper's "jitter" (random shifts of up to k pixels, zero filled).

One shift function serves both places that need it: ``Jitter`` inside a model (fresh random
shifts in training mode) and the data pipeline (``seeded_shift``: the shift of each sample is a
pure function of (seed, epoch, id), so the same seed gives the same augmented views and
teacher and student can be shown the very same view).
"""
from __future__ import annotations

import numpy as np
import torch

from kd_ray.core.subsets import stable_hash


def shift_images(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift each image [B, C, H, W] by (dy[i], dx[i]) pixels, filling with zeros."""
    if images.dim() != 4:
        raise ValueError(f"shift_images expects [B, C, H, W], got {tuple(images.shape)}")
    out = torch.zeros_like(images)
    h, w = images.shape[-2:]
    pairs = torch.stack([dy, dx], dim=1)
    for sy, sx in torch.unique(pairs, dim=0).tolist():
        rows = ((pairs[:, 0] == sy) & (pairs[:, 1] == sx)).nonzero(as_tuple=True)[0]
        if abs(sy) >= h or abs(sx) >= w:
            continue
        src = images[rows][..., max(0, -sy): h - max(0, sy), max(0, -sx): w - max(0, sx)]
        out[rows, :, max(0, sy): h - max(0, -sy), max(0, sx): w - max(0, -sx)] = src
    return out


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent uniform shifts in [-max_shift, max_shift] on both axes."""
    if max_shift <= 0:
        return images
    b = images.shape[0]
    d = torch.randint(-max_shift, max_shift + 1, (2, b), generator=generator, device="cpu")
    return shift_images(images, d[0].to(images.device), d[1].to(images.device))


def seeded_offsets(ids: np.ndarray, max_shift: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The (dy, dx) shift of each sample: a pure function of (seed, epoch, id)."""
    span = 2 * max_shift + 1
    h = stable_hash(ids, seed * 1_000_003 + epoch)
    return (h % span).astype(np.int64) - max_shift, ((h // span) % span).astype(np.int64) - max_shift


def seeded_shift(images, ids, max_shift: int, seed: int, epoch: int):
    """Deterministic shifts: sample ``id`` at ``epoch`` always moves the same way. Takes and
    returns a numpy array or a torch tensor (kept on its device)."""
    if max_shift <= 0:
        return images
    if isinstance(images, torch.Tensor):
        ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids
        dy, dx = seeded_offsets(np.asarray(ids), max_shift, seed, epoch)
        return shift_images(images, torch.from_numpy(dy).to(images.device), torch.from_numpy(dx).to(images.device))
    dy, dx = seeded_offsets(np.asarray(ids), max_shift, seed, epoch)
    return shift_images(torch.from_numpy(np.array(images)), torch.from_numpy(dy), torch.from_numpy(dx)).numpy()


def view_shift(images, ids, views, max_shift: int, seed: int):
    """View ``views[i]`` of sample ``ids[i]``: the shift ``seeded_shift`` gives it at "epoch"
    ``views[i]`` under ``seed``, so each of a sample's V cached views is a pure function of
    (seed, view, id) and is rebuilt from the source image, never stored (numpy or torch)."""
    views = views.cpu().numpy() if isinstance(views, torch.Tensor) else np.asarray(views)
    out = images.clone() if isinstance(images, torch.Tensor) else np.array(images)
    for v in np.unique(views):
        m = np.flatnonzero(views == v)
        idx = torch.from_numpy(m).to(images.device) if isinstance(images, torch.Tensor) else m
        sel_ids = ids[idx] if isinstance(ids, torch.Tensor) else np.asarray(ids)[m]
        out[idx] = seeded_shift(images[idx], sel_ids, max_shift, seed, int(v))
    return out


def view_mixup(ids: np.ndarray, views: np.ndarray, pool: np.ndarray, a: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The mixup partner (an id of the sorted ``pool``) and weight of view ``views[i]`` of sample
    ``ids[i]``: ``seeded_mixup`` of the pool with the view as its "epoch", so each cached view's
    mix is a pure function of (seed, view, id) for a given pool (the views cache's rows)."""
    partners, weights = np.zeros(len(ids), np.int64), np.ones(len(ids), np.float32)
    for v in np.unique(views):
        m = np.flatnonzero(views == v)
        partner, lam = seeded_mixup(len(pool), a, seed, int(v))
        j = np.searchsorted(pool, ids[m])
        partners[m], weights[m] = pool[partner[j]], lam[j]
    return partners, weights


def cached_view(images, ids, views, max_shift: int, seed: int, mixed=None):
    """The cached view ``views[i]`` of sample ``ids[i]`` rebuilt from its source image: its shift
    (``view_shift``) and, with ``mixed = (partner_images, partner_ids, weights)``, mixed with its
    partner's shifted view. The one function behind what the teachers label and what a
    ``cached_views`` student trains on (numpy or torch)."""
    out = view_shift(images, ids, views, max_shift, seed)
    if mixed is not None:
        partner_images, partner_ids, weights = mixed
        out = mix(out, view_shift(partner_images, partner_ids, views, max_shift, seed), weights)
    return out


def chosen_views(ids: np.ndarray, num_views: int, seed: int, epoch: int) -> np.ndarray:
    """Which of its ``num_views`` cached views sample ``id`` trains on in ``epoch`` (pure function
    of (seed, epoch, id))."""
    return (stable_hash(np.asarray(ids), seed * 1_000_003 + epoch + 0x76696577) % np.uint64(num_views)).astype(np.int64)


def seeded_mixup(n: int, a: float, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Mixup partners for a pool of ``n`` images (Beyer et al. 2022's "function matching"):
    image ``i`` of the pool becomes ``lam[i] * x[i] + (1 - lam[i]) * x[partner[i]]``, with
    ``lam ~ Beta(a, a)`` and ``partner`` uniform over the pool; a pure function of
    (n, a, seed, epoch), so teacher and student see the same mixed image."""
    if not a > 0:
        raise ValueError(f"mixup needs a Beta parameter > 0, got {a}")
    rng = np.random.default_rng([seed, epoch, 0x6D6978])  # a stream apart from epoch_order's
    return rng.integers(0, n, n), rng.beta(a, a, n).astype(np.float32)


def mix(images, partner_images, lam):
    """``lam * images + (1 - lam) * partner_images`` per sample (numpy or torch, [B, C, H, W])."""
    w = lam.reshape(-1, *([1] * (images.ndim - 1)))
    return w * images + (1 - w) * partner_images
