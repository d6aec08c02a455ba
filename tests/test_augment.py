"""Reference augmentation (train/augment.py): each transform against what it is defined to do, the spec's errors,
and the per-row determinism the feature cache relies on."""

import numpy as np
import pytest
import torch

from vlhooks.errors import TrainingError
from vlhooks.train.augment import (AugmentedReferences, AugmentSpec, augment_images, pick_variant,
                                   reference_variants)


def _box(h0, h1, w0, w1, side=28, value=255):
    a = np.zeros((side, side), np.uint8)
    a[h0:h1, w0:w1] = value
    return a


def _one(image, g=0, **spec):
    return augment_images([image], AugmentSpec.from_dict({"p": 1.0, **spec}), torch.Generator().manual_seed(g))[0]


def _extent(a, axis):
    """Rows (axis 1) or columns (axis 0) holding ink above half the range."""
    return int(((a > 127).any(axis=axis)).sum())


def test_nothing_asked_leaves_the_image_unchanged():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(3)]
    out = augment_images(imgs, AugmentSpec.from_dict({"p": 1.0}), torch.Generator().manual_seed(0))
    for a, b in zip(imgs, out):
        assert np.array_equal(a, b)
    # p = 0: every transform asked for, none applied
    spec = AugmentSpec.from_dict({"p": 0.0, "rotate": 30, "morph": [1, 1], "blur": [1.0, 1.0], "invert_p": 0.0})
    for a, b in zip(imgs, augment_images(imgs, spec, torch.Generator().manual_seed(0))):
        assert np.array_equal(a, b)


def test_morph_is_grey_dilation_and_erosion():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (12, 12), dtype=np.uint8)
    pad = np.pad(a.astype(int), 1, mode="constant", constant_values=-1)
    win = np.stack([pad[i:i + 12, j:j + 12] for i in range(3) for j in range(3)])
    dil = win.max(0)  # 3x3 maximum, border outside the image ignored
    padm = np.pad(a.astype(int), 1, mode="constant", constant_values=256)
    ero = np.stack([padm[i:i + 12, j:j + 12] for i in range(3) for j in range(3)]).min(0)
    assert np.array_equal(_one(a, morph=[1, 1]), dil)
    assert np.array_equal(_one(a, morph=[-1, -1]), ero)


def test_contrast_gamma_and_invert_follow_their_formulas():
    a = np.array([[0, 64, 128, 255]] * 4, np.uint8)
    x = a / 255.0
    want = np.round(np.clip(0.5 * x, 0, 1) ** 2.0 * 255).astype(np.uint8)  # background 0
    assert np.array_equal(_one(a, contrast=[0.5, 0.5], gamma=[2.0, 2.0]), want)
    inv = _one(a, invert_p=1.0)
    assert np.array_equal(inv.astype(int), 0 + 255 - a.astype(int))  # bg + top - y


def test_scale_and_aspect_stretch_the_ink_as_asked():
    bar = _box(8, 20, 13, 15)  # a 12 x 2 bar in the middle
    assert (_extent(bar, 1), _extent(bar, 0)) == (12, 2)
    zoom = _one(bar, scale=[1.5, 1.5])
    assert abs(_extent(zoom, 1) - 18) <= 1 and abs(_extent(zoom, 0) - 3) <= 1
    wide = _one(bar, aspect=[2.0, 2.0])  # the width doubles, the height stays
    assert _extent(wide, 1) == 12 and abs(_extent(wide, 0) - 4) <= 1
    narrow = _one(_box(13, 15, 8, 20), aspect=[0.5, 0.5])  # a 2 x 12 bar: the width halves
    assert _extent(narrow, 1) == 2 and abs(_extent(narrow, 0) - 6) <= 1


def test_aspect_left_at_one_draws_what_older_recipes_drew():
    """A recipe without `aspect` must get the augmentations its shipped adapter was trained on: the default draws
    nothing more from the generator, so every later draw is unchanged."""
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(4)]
    spec = {"p": 1.0, "rotate": 15, "scale": [0.9, 1.1], "translate": 0.1, "blur": [0.0, 1.0], "contrast": [0.6, 1.0]}
    a = augment_images(imgs, AugmentSpec.from_dict(spec), torch.Generator().manual_seed(3))
    b = augment_images(imgs, AugmentSpec.from_dict({**spec, "aspect": [1.0, 1.0]}), torch.Generator().manual_seed(3))
    c = augment_images(imgs, AugmentSpec.from_dict({**spec, "aspect": [0.7, 1.4]}), torch.Generator().manual_seed(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("spec, needle", [
    ({"copies": 0}, "copies"),
    ({"p": 1.5}, "data.augment.p"),
    ({"aspect": [1.2, 0.8]}, "data.augment.aspect"),
    ({"aspect": [0.0, 1.0]}, "aspect"),
    ({"rotat": 10}, "unknown key"),
    ("rotate", "mapping"),
])
def test_bad_spec_names_the_key(spec, needle):
    with pytest.raises(TrainingError, match=needle):
        AugmentSpec.from_dict(spec)


def test_same_label_variants_are_other_items_of_the_label():
    labels = np.array([0, 1, 0, 1, 0, 2])
    idx = reference_variants(len(labels), labels, "same_label", 3, seed=0)
    for i, row in enumerate(idx):
        if labels[i] == 2:  # alone in its class: itself
            assert (row == i).all()
        else:
            assert (labels[row] == labels[i]).all() and (row != i).all()
    assert (reference_variants(4, labels[:4], "self", 2, seed=0) == np.arange(4)[:, None]).all()


def test_augmented_references_are_deterministic_per_row_and_keep_the_clean_first():
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(6)]
    labels = np.array([0, 0, 0, 1, 1, 1])
    seen = []

    def encoder(imgs):  # the pixels themselves as one token each: [B, 1, 784]
        seen.append([np.asarray(i).copy() for i in imgs])
        return torch.from_numpy(np.stack(imgs).reshape(len(imgs), 1, -1).astype(np.float32)), None

    aug = AugmentedReferences({"copies": 3, "p": 1.0, "rotate": 20, "blur": [0.5, 1.0]}, images, labels,
                              "same_label", seed=5)
    f1, mask = aug(encoder, [4, 1])
    f2, _ = aug(encoder, [1])
    assert mask is None and f1.shape == (2, 3, 1, 784)
    assert torch.equal(f1[1], f2[0])  # row 1 draws the same variants in any batch
    first = aug.index[4][0]
    assert np.array_equal(f1[0, 0, 0].numpy().reshape(28, 28), images[first])  # keep_first: clean
    assert not np.array_equal(f1[0, 1, 0].numpy().reshape(28, 28), images[aug.index[4][1]])
    feats, m = pick_variant(f1, None, torch.Generator().manual_seed(0))
    assert feats.shape == (2, 1, 784) and m is None
    assert any(torch.equal(feats[0], f1[0, k]) for k in range(3))
