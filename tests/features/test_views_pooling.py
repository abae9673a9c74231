"""Augmented views (``cnn``, ``frame_cnn``), the spatial grid (``cnn``) and frame pooling of the
sequence audio features (mfcc, melspec, stft, cqt), each against an independent computation:
torchvision's transforms and forward, numpy statistics over the unpooled frames."""

from __future__ import annotations

import numpy as np
import pytest
from media_factories import make_rgb_video

from features import create_extractor
from features.errors import ConfigError
from features.image import view_params, view_seed

CPU = {"device": "cpu"}
SIZE = 32
VIEWS = {"image_size": SIZE, "views": 3, "crop_scale": (0.3, 0.9), "augment_seed": 7, **CPU}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def resnet18():
    """torchvision's resnet18 as the extractors build it for seed 0: random init, head removed."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    return model.eval()


def _normalise(x):
    import torch

    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET)
    return (x - mean) / std


def _crop(image, params, size=SIZE):
    """Reference view: torchvision's resized_crop (+ horizontal_flip) of an (H, W, 3) uint8 image."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    top, left, height, width, flipped = params
    x = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
    x = TF.resized_crop(x, top, left, height, width, [size, size], antialias=True)
    return _normalise(TF.horizontal_flip(x) if flipped else x)


def _forward(model, inputs):
    import torch

    with torch.no_grad():
        return model(torch.stack(inputs)).numpy()


# --- views --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 56), (56, 40), (8, 80)])  # (8, 80): torchvision's fallback crop
def test_view_params_draw_what_torchvision_v2_transforms_draw(shape, image_factory):
    """Under a global seed equal to view_seed, v2.RandomResizedCrop + v2.RandomHorizontalFlip
    produce exactly the view that view_params describes."""
    import torch
    from torchvision.transforms import v2

    image = image_factory(*shape, seed=3)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    scale = (0.3, 0.9)
    for view in range(4):
        params = view_params(image, 7, view, scale, flip=True)
        top, left, h, w, _ = params
        assert 0 <= top <= shape[0] - h and 0 <= left <= shape[1] - w
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(image, 7, view))
            transform = v2.Compose(
                [v2.RandomResizedCrop(SIZE, scale=scale, antialias=True), v2.RandomHorizontalFlip(0.5)]
            )
            expected = _normalise(transform(x))
        torch.testing.assert_close(_crop(image, params), expected, rtol=0, atol=0)


def test_cnn_views_equal_torchvision_forward_of_each_crop(image_factory, resnet18):
    image = image_factory(40, 56, seed=1)
    ex = create_extractor("cnn", VIEWS)
    assert ex.output_spec()["embedding"].shape == (3, 512)
    got = ex.extract(image)["embedding"]
    assert got.shape == (3, 512) and got.dtype == np.float32
    params = [view_params(image, 7, k, (0.3, 0.9), flip=True) for k in range(3)]
    assert len(set(params)) == 3
    expected = _forward(resnet18, [_crop(image, p) for p in params])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    # Views differ from each other and from the plain (un-augmented) embedding.
    assert not np.allclose(got[0], got[1]) and not np.allclose(got[1], got[2])
    plain = create_extractor("cnn", {"image_size": SIZE, **CPU}).extract(image)["embedding"]
    assert plain.shape == (512,) and not np.allclose(got[0], plain)


def test_cnn_views_are_deterministic_and_independent_of_batch(image_factory):
    a, b = image_factory(40, 56, seed=1), image_factory(48, 48, seed=2)
    first = create_extractor("cnn", VIEWS).extract(a)["embedding"]
    again = create_extractor("cnn", VIEWS).extract(a.copy())["embedding"]  # a fresh instance
    np.testing.assert_array_equal(first, again)
    other_seed = create_extractor("cnn", {**VIEWS, "augment_seed": 8}).extract(a)["embedding"]
    assert not np.allclose(first, other_seed)

    ex = create_extractor("cnn", {**VIEWS, "batch_size": 2})  # views of one image split over batches
    ab, ba = ex.extract_batch([a, b]), ex.extract_batch([b, a])
    np.testing.assert_allclose(ab[0]["embedding"], ba[1]["embedding"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ab[1]["embedding"], ba[0]["embedding"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ab[0]["embedding"], first, atol=1e-5, rtol=1e-5)


def test_cnn_views_without_flip_never_flip(image_factory):
    image = image_factory(40, 56, seed=4)
    flips = [view_params(image, 0, k, flip=True)[4] for k in range(16)]
    assert any(flips) and not all(flips)
    no_flip = [view_params(image, 0, k, flip=False) for k in range(16)]
    assert not any(p[4] for p in no_flip)
    # Turning flip off leaves the crops alone.
    assert [p[:4] for p in no_flip] == [view_params(image, 0, k)[:4] for k in range(16)]


@pytest.fixture
def make_video():
    return make_rgb_video


def test_frame_cnn_views_share_one_crop_over_time(make_video, resnet18):
    video = make_video(frames=3)
    params = {"image_size": SIZE, "num_frames": None, "views": 2, "augment_seed": 5, "batch_size": 4, **CPU}
    ex = create_extractor("frame_cnn", params)
    assert ex.output_spec()["embedding"].shape == (None, 2, 512)
    got = ex.extract(video)["embedding"]
    assert got.shape == (3, 2, 512) and got.dtype == np.float32
    crops = [view_params(video, 5, k) for k in range(2)]  # one per view, from the whole video
    assert crops[0] != crops[1]
    expected = _forward(resnet18, [_crop(frame, crops[k]) for frame in video for k in range(2)])
    np.testing.assert_allclose(got, expected.reshape(3, 2, 512), atol=1e-5, rtol=1e-5)
    # In a batch with another video: the same rows.
    out = ex.extract_batch([make_video(frames=2, seed=1), video])
    assert out[0]["embedding"].shape == (2, 2, 512)
    np.testing.assert_allclose(out[1]["embedding"], got, atol=1e-5, rtol=1e-5)


def test_bad_view_configs():
    for name in ("cnn", "frame_cnn"):
        with pytest.raises(ConfigError, match=rf"extractor '{name}': views must be an integer >= 1"):
            create_extractor(name, {"views": 0})
        for scale in ([0.0, 1.0], [0.8, 0.5], [0.5, 1.2], [0.5]):
            with pytest.raises(
                ConfigError, match=r"crop_scale must be two area fractions .* 0 < low <= high <= 1"
            ):
                create_extractor(name, {"crop_scale": scale})
        with pytest.raises(ConfigError, match="flip must be true or false"):
            create_extractor(name, {"flip": "yes"})
    # YAML lists become the tuple the params round-trip through.
    ex = create_extractor("cnn", {"crop_scale": [0.5, 1]})
    assert ex.params()["crop_scale"] == (0.5, 1.0)


# --- grid ---------------------------------------------------------------------------------


def test_cnn_grid_equals_resnet18_up_to_layer4(image_factory, resnet18):
    import torch
    import torch.nn.functional as F

    images = [image_factory(40, 56, seed=1), image_factory(64, 64, seed=2)]
    ex = create_extractor("cnn", {"image_size": 64, "grid": True, **CPU})
    spec = ex.output_spec()
    assert spec["grid"].shape == (512, 2, 2) and spec["embedding"].shape == (512,)
    out = ex.extract_batch(images)

    m = resnet18
    for image, o in zip(images, out, strict=True):
        x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
        x = _normalise(F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)[0])[None]
        with torch.no_grad():
            fmap = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))[0]
        spec["grid"].check("grid", o["grid"])
        np.testing.assert_allclose(o["grid"], fmap.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(o["grid"].mean(axis=(1, 2)), o["embedding"], atol=1e-5)


def test_cnn_grid_with_views_and_other_backbones(image_factory):
    image = image_factory(40, 56, seed=3)
    ex = create_extractor("cnn", {**VIEWS, "image_size": 64, "views": 2, "grid": True})
    assert ex.output_spec()["grid"].shape == (2, 512, 2, 2)
    out = ex.extract(image)
    assert out["grid"].shape == (2, 512, 2, 2) and out["embedding"].shape == (2, 512)
    np.testing.assert_allclose(out["grid"].mean(axis=(2, 3)), out["embedding"], atol=1e-5)

    mobile = create_extractor(
        "cnn", {"backbone": "mobilenet_v3_small", "image_size": 64, "grid": True, **CPU}
    )
    got = mobile.extract(image)
    for field, fs in mobile.output_spec().items():
        fs.check(field, got[field])
    assert got["grid"].shape == (576, 2, 2)
    np.testing.assert_allclose(got["grid"].mean(axis=(1, 2)), got["embedding"], atol=1e-5)


def test_vit_grid_is_a_config_error():
    with pytest.raises(ConfigError, match="extractor 'cnn': grid is not available for ViT backbones"):
        create_extractor("cnn", {"backbone": "vit_b_16", "grid": True})


# --- pooling of sequence audio features ---------------------------------------------------

AUDIO = {
    "mfcc": {"n_mfcc": 13, "n_mels": 26, "deltas": True},
    "melspec": {"n_mels": 32},
    "stft": {"n_fft": 256},
    "cqt": {"n_bins": 36},
}
NUMPY_POOLS = {
    "mean": lambda x: [x.mean(0)],
    "meanstd": lambda x: [x.mean(0), x.std(0)],
    "stats": lambda x: [x.mean(0), x.std(0), x.min(0), x.max(0)],
}


@pytest.mark.filterwarnings("ignore:n_fft=.* is too large:UserWarning")
@pytest.mark.parametrize("name", sorted(AUDIO))
def test_pooled_audio_equals_numpy_over_frames(name, audio_factory):
    y = audio_factory(0.4, 16000)
    frames = create_extractor(name, AUDIO[name]).extract(y)[name]  # pool="none": (frames, n)
    n = frames.shape[1]
    assert frames.ndim == 2 and frames.shape[0] > 1
    x = frames.astype(np.float64)
    for pool, stats in NUMPY_POOLS.items():
        ex = create_extractor(name, {**AUDIO[name], "pool": pool})
        spec = ex.output_spec()[name]
        expected = np.concatenate(stats(x)).astype(np.float32)
        assert spec.shape == (len(stats(x)) * n,) and not spec.variable
        got = ex.extract(y)[name]
        spec.check(name, got)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_bad_pool_lists_the_choices():
    for name in AUDIO:
        with pytest.raises(
            ConfigError,
            match=rf"extractor '{name}': pool must be one of \['none', 'mean', 'meanstd', 'stats'\].*got 'max'",
        ):
            create_extractor(name, {"pool": "max"})
