import numpy as np
import pytest
import torch

from kd_ray.core.augment import random_shift, seeded_shift, shift_images


def test_shift_moves_pixels_and_fills_zeros():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4) + 1
    out = shift_images(x, torch.tensor([1]), torch.tensor([-1]))
    assert torch.equal(out[0, 0, 1:, :3], x[0, 0, :3, 1:])
    assert (out[0, 0, 0] == 0).all() and (out[0, 0, :, 3] == 0).all()


def test_seeded_shift_is_a_function_of_seed_epoch_and_id():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    ids = np.arange(64)
    a = seeded_shift(images, ids, 2, seed=1, epoch=0)
    assert np.array_equal(a, seeded_shift(images, ids, 2, seed=1, epoch=0))
    assert not np.array_equal(a, seeded_shift(images, ids, 2, seed=2, epoch=0))
    assert not np.array_equal(a, seeded_shift(images, ids, 2, seed=1, epoch=1))
    # the view of one sample does not depend on which batch it came in
    part = seeded_shift(images[10:20], ids[10:20], 2, seed=1, epoch=0)
    assert np.array_equal(part, a[10:20])


def test_random_shift_bounded():
    x = torch.ones(32, 1, 8, 8)
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    # at most 2 rows and 2 columns zeroed, so at least 6x6 ones remain
    assert (out.sum(dim=(1, 2, 3)) >= 36).all()


def test_seeded_shift_gives_the_same_view_for_numpy_and_torch():
    # the inconsistent student shifts torch batches in the Train loop; the consistent teacher
    # shifts numpy batches in its actor: one sample's view must not depend on which
    images = np.random.default_rng(1).normal(size=(32, 1, 8, 8)).astype(np.float32)
    ids = np.arange(100, 132)
    want = seeded_shift(images, ids, 1, seed=3, epoch=4)
    got = seeded_shift(torch.from_numpy(images), torch.from_numpy(ids), 1, seed=3, epoch=4)
    assert isinstance(got, torch.Tensor) and np.array_equal(got.numpy(), want)
    assert not np.array_equal(want, images)


def test_seeded_mixup_is_a_function_of_seed_and_epoch():
    from kd_ray.core.augment import mix, seeded_mixup

    partner, lam = seeded_mixup(50, 1.0, seed=3, epoch=2)
    again = seeded_mixup(50, 1.0, seed=3, epoch=2)
    assert np.array_equal(partner, again[0]) and np.array_equal(lam, again[1])
    assert not np.array_equal(partner, seeded_mixup(50, 1.0, seed=4, epoch=2)[0])
    assert not np.array_equal(lam, seeded_mixup(50, 1.0, seed=3, epoch=3)[1])
    assert partner.min() >= 0 and partner.max() < 50 and ((lam >= 0) & (lam <= 1)).all()
    assert 0.3 < lam.mean() < 0.7  # Beta(1, 1) is uniform
    with pytest.raises(ValueError, match="Beta parameter"):
        seeded_mixup(50, 0.0, 0, 0)
    # the mixed image, per sample, in numpy and in torch
    x, y = np.ones((2, 1, 2, 2), np.float32), np.zeros((2, 1, 2, 2), np.float32)
    w = np.array([0.25, 1.0], np.float32)
    assert np.allclose(mix(x, y, w)[:, 0, 0, 0], [0.25, 1.0])
    assert torch.allclose(mix(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w)), torch.from_numpy(mix(x, y, w)))


def test_cached_views_are_seeded_shifts_and_each_epoch_picks_one():
    from kd_ray.core.augment import chosen_views, view_shift

    x = np.random.default_rng(0).random((8, 1, 8, 8)).astype(np.float32)
    ids, views = np.arange(100, 108), np.array([0, 3, 1, 3, 2, 0, 1, 2])
    got = view_shift(x, ids, views, 1, 7)
    for i in range(8):  # view v of id i is seeded_shift's "epoch v" of that id
        assert np.array_equal(got[i:i + 1], seeded_shift(x[i:i + 1], ids[i:i + 1], 1, 7, int(views[i])))
    as_torch = view_shift(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(views), 1, 7)
    assert np.array_equal(as_torch.numpy(), got)
    pick = chosen_views(np.arange(1000), 8, 0, 3)
    assert pick.min() >= 0 and pick.max() == 7 and np.array_equal(pick, chosen_views(np.arange(1000), 8, 0, 3))
    assert not np.array_equal(pick, chosen_views(np.arange(1000), 8, 0, 4))  # another epoch, other views


def test_mixed_cached_views_are_pure_functions_of_seed_view_and_id():
    """A mixed view's partner and weight depend on (seed, view, id) and the pool only, not on which
    other rows share the batch; the rebuilt view is the shifted image mixed with the partner's
    shifted view (numpy and torch alike)."""
    from kd_ray.core.augment import cached_view, mix, view_mixup, view_shift

    pool = np.arange(10, 60, 2)  # sorted ids
    ids, views = np.repeat(pool, 3), np.tile(np.arange(3), len(pool))
    partner, w = view_mixup(ids, views, pool, 1.0, 7)
    assert np.isin(partner, pool).all() and ((w > 0) & (w < 1)).all()
    some = np.array([5, 17, 40])  # a few of the same rows, in another batch
    p2, w2 = view_mixup(ids[some], views[some], pool, 1.0, 7)
    assert np.array_equal(p2, partner[some]) and np.array_equal(w2, w[some])
    assert not np.array_equal(view_mixup(ids, views, pool, 1.0, 8)[0], partner)  # another seed
    rng = np.random.default_rng(0)
    images, partners = (rng.random((len(ids), 1, 8, 8)).astype(np.float32) for _ in range(2))
    got = cached_view(images, ids, views, 1, 7, (partners, partner, w))
    want = mix(view_shift(images, ids, views, 1, 7), view_shift(partners, partner, views, 1, 7), w)
    assert np.array_equal(got, want)
    as_torch = cached_view(*(torch.from_numpy(a) for a in (images, ids, views)), 1, 7,
                           tuple(torch.from_numpy(a) for a in (partners, partner, w)))
    np.testing.assert_allclose(as_torch.numpy(), got, atol=1e-7)
    assert np.array_equal(cached_view(images, ids, views, 1, 7), view_shift(images, ids, views, 1, 7))
