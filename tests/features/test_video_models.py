"""Video model extractors against torchvision's own forward: ``frame_cnn`` (image backbone per
frame), ``clip`` (video classifiers, head removed) and ``flow`` with ``method="raft"``.

Inputs stay tiny (32 px images, 8-frame clips, RAFT at its 128 px minimum with 2 refinement
steps): the random-init weights are seeded, so every comparison is exact up to float error."""

from __future__ import annotations

import numpy as np
import pytest
from media_factories import make_rgb_video

from features import create_extractor
from features.errors import ConfigError, MediaError

CPU = {"device": "cpu"}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
KINETICS = ((0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989))


def _resize_normalise(frames, size, mean_std):
    """Reference preprocessing: (T, H, W, 3) uint8 -> (T, 3, size, size) float, by hand."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - mean) / std


@pytest.fixture
def make_video():
    return make_rgb_video


# --- frame_cnn ----------------------------------------------------------------------------


def _resnet18_reference(frames, size, seed):
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        return model.eval()(_resize_normalise(frames, size, IMAGENET)).numpy()


def test_frame_cnn_equals_torchvision_forward_per_frame(make_video):
    video = make_video(frames=3)
    ex = create_extractor("frame_cnn", {"image_size": 32, "num_frames": None, "seed": 3, **CPU})
    assert ex.output_spec()["embedding"].shape == (None, 512)
    got = ex.extract(video)["embedding"]
    assert got.shape == (3, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, _resnet18_reference(video, 32, seed=3), atol=1e-5, rtol=1e-5)
    # ... which is the image extractor run on each frame.
    cnn = create_extractor("cnn", {"image_size": 32, "seed": 3, **CPU})
    per_frame = np.stack([o["embedding"] for o in cnn.extract_batch(list(video))])
    np.testing.assert_allclose(got, per_frame, atol=1e-5, rtol=1e-5)


def test_frame_cnn_samples_num_frames_evenly_and_batches_across_videos(make_video):
    video = make_video(frames=5)
    ex = create_extractor("frame_cnn", {"image_size": 32, "num_frames": 3, "batch_size": 2, **CPU})
    reference = _resnet18_reference(video[[0, 2, 4]], 32, seed=0)  # linspace(0, 4, 3)
    np.testing.assert_allclose(ex.extract(video)["embedding"], reference, atol=1e-5, rtol=1e-5)
    # Two videos through one batched call: rows are split back per video.
    other = make_video(frames=3, seed=1)
    out = ex.extract_batch([video, other, video[[0, 2, 4]]])
    assert [o["embedding"].shape for o in out] == [(3, 512)] * 3
    np.testing.assert_allclose(out[0]["embedding"], reference, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[2]["embedding"], reference, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        out[1]["embedding"], _resnet18_reference(other, 32, seed=0), atol=1e-5, rtol=1e-5
    )


def test_frame_cnn_gray_frames_are_repeated_to_rgb_and_capped(make_video):
    video = make_video(frames=4)
    gray = video[..., 0]
    ex = create_extractor("frame_cnn", {"image_size": 32, "num_frames": None, "max_frames": 2, **CPU})
    got = ex.extract(gray)["embedding"]
    rgb = np.repeat(gray[:2, ..., None], 3, axis=-1)
    np.testing.assert_allclose(got, _resnet18_reference(rgb, 32, seed=0), atol=1e-5, rtol=1e-5)


def test_frame_cnn_decode_request_through_mp4(media_files, make_video):
    from pipelines.media import load_video

    path = media_files.mp4("v.mp4", make_video(frames=10, height=32, width=48))
    ex = create_extractor("frame_cnn", {"image_size": 32, "num_frames": 4, **CPU})
    assert ex.decode_request() == {
        "gray": False,
        "size": None,
        "fps": None,
        "num_frames": 4,
        "max_frames": 64,
    }
    video = load_video(path, **ex.decode_request())
    assert video.shape == (4, 32, 48, 3)
    assert ex.extract(video)["embedding"].shape == (4, 512)
    by_fps = create_extractor("frame_cnn", {"fps": 5.0, "num_frames": None, "max_frames": 0})
    assert by_fps.decode_request() == {
        "gray": False,
        "size": None,
        "fps": 5.0,
        "num_frames": None,
        "max_frames": None,
    }
    assert load_video(path, **by_fps.decode_request()).shape[0] == 5  # 1 s at 10 fps -> 5 frames


def test_frame_cnn_bad_configs_and_media():
    with pytest.raises(ConfigError, match=r"at most one of fps \(2.0\) and num_frames \(8\)"):
        create_extractor("frame_cnn", {"fps": 2.0})
    with pytest.raises(ConfigError, match=r"num_frames \(100\) exceeds max_frames \(64\)"):
        create_extractor("frame_cnn", {"num_frames": 100})
    with pytest.raises(ConfigError, match="backbone 'alexnet' is not supported"):
        create_extractor("frame_cnn", {"backbone": "alexnet"})
    with pytest.raises(ConfigError, match=r"extractor 'frame_cnn': weights 'NOPE' do not exist"):
        create_extractor("frame_cnn", {"weights": "NOPE"}).setup()
    ex = create_extractor("frame_cnn", {"image_size": 32, **CPU})
    with pytest.raises(MediaError, match="frame_cnn: expected uint8 video"):
        ex.extract(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(MediaError, match="frame_cnn: video has no frames"):
        ex.extract(np.zeros((0, 8, 8, 3), dtype=np.uint8))


# --- clip ---------------------------------------------------------------------------------


def _video_model_reference(backbone, clips, size, seed=0, state_dict=None, **build):
    """torchvision's model and forward, head replaced by Identity; S3D's fixed 7x7 avgpool
    (sized for 224 px) replaced by a global one, so its forward pools whatever size comes in."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(backbone, weights=None, **build)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    if backbone == "s3d":
        model.avgpool = torch.nn.AdaptiveAvgPool3d(1)
        model.classifier = torch.nn.Identity()
    else:
        model.fc = torch.nn.Identity()
    x = torch.stack(
        [_resize_normalise(c, size, KINETICS).permute(1, 0, 2, 3) for c in clips]
    )  # (N, 3, T, s, s)
    with torch.no_grad():
        return model.eval()(x).numpy()


@pytest.mark.parametrize("backbone, dim", [("r3d_18", 512), ("s3d", 1024)])
def test_clip_equals_torchvision_forward(backbone, dim, make_video):
    video = make_video(frames=10, height=36, width=44, seed=2)
    ex = create_extractor(
        "clip", {"backbone": backbone, "clip_len": 8, "image_size": 32, "clips": 2, "seed": 1, **CPU}
    )
    assert ex.output_spec()["embedding"].shape == (2, dim)
    got = ex.extract(video)["embedding"]
    assert got.shape == (2, dim) and got.dtype == np.float32
    expected = _video_model_reference(backbone, [video[0:8], video[2:10]], 32, seed=1)  # starts 0, 2
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_clip_pads_short_videos_with_the_last_frame(make_video):
    video = make_video(frames=3, height=32, width=32)
    ex = create_extractor("clip", {"backbone": "s3d", "clip_len": 8, "image_size": 32, "clips": 3, **CPU})
    got = ex.extract(video)["embedding"]
    padded = video[[0, 1, 2, 2, 2, 2, 2, 2]]
    expected = _video_model_reference("s3d", [padded], 32)[0]
    assert got.shape == (3, 1024)  # fixed shape: one clip possible, repeated
    for row in got:
        np.testing.assert_allclose(row, expected, atol=1e-5, rtol=1e-4)


def test_clip_loads_local_checkpoint(tmp_path, make_video):
    import torch
    import torchvision

    torch.manual_seed(7)
    trained = torchvision.models.video.s3d(weights=None, num_classes=5)  # another head: ignored
    path = tmp_path / "s3d.pth"
    torch.save({"state_dict": trained.state_dict()}, path)
    video = make_video(frames=8, height=32, width=32)
    params = {"backbone": "s3d", "clip_len": 8, "image_size": 32, **CPU}
    got = create_extractor("clip", {**params, "weights": str(path)}).extract(video)["embedding"]
    expected = _video_model_reference("s3d", [video], 32, state_dict=trained.state_dict(), num_classes=5)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not np.allclose(got, create_extractor("clip", params).extract(video)["embedding"])


def test_clip_dims_match_every_headless_backbone():
    """The spec's embedding size, against each torchvision model's output (meta device: no
    weights are allocated, nothing is computed)."""
    import torch
    import torchvision

    from features.video_models import CLIP_BACKBONES

    for backbone in CLIP_BACKBONES:
        size = 224 if backbone == "mvit_v1_b" else 112
        ex = create_extractor("clip", {"backbone": backbone, "image_size": size, "clips": 2})
        with torch.device("meta"):
            model = torchvision.models.get_model(backbone, weights=None)
            ref = _headless(model, backbone)
            out = ref.eval()(torch.zeros(1, 3, 16, size, size))
        assert ex.output_spec()["embedding"].shape == (2, out.shape[1]), backbone


def _headless(model, backbone):
    import torch

    if backbone == "s3d":
        model.avgpool, model.classifier = torch.nn.AdaptiveAvgPool3d(1), torch.nn.Identity()
    elif backbone == "mvit_v1_b":
        model.head = torch.nn.Identity()
    else:
        model.fc = torch.nn.Identity()
    return model


def test_clip_torchvision_weights_use_their_transforms_at_image_size():
    import torch
    from torchvision.models.video import R3D_18_Weights, S3D_Weights

    from features.video_models import make_clip_preprocess

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 90, 120), dtype=np.uint8))
    weights = R3D_18_Weights.KINETICS400_V1  # only its transforms: nothing is downloaded
    torch.testing.assert_close(make_clip_preprocess(112, weights)(x), weights.transforms()(x))
    small = make_clip_preprocess(56, S3D_Weights.KINETICS400_V1)  # 256/224 kept: resize 64, crop 56
    assert small.resize_size == [64, 64] and small.crop_size == [56, 56]
    assert small(x).shape == (3, 4, 56, 56)


def test_clip_decode_request_and_bad_configs():
    assert create_extractor("clip").decode_request() == {
        "gray": False,
        "size": None,
        "fps": 15.0,
        "num_frames": None,
        "max_frames": 256,
    }
    with pytest.raises(ConfigError, match=r"backbone 'x3d_s' is not supported; use one of \['mc3_18'"):
        create_extractor("clip", {"backbone": "x3d_s"})
    with pytest.raises(ConfigError, match="mvit_v1_b is built for clip_len=16 and image_size=224"):
        create_extractor("clip", {"backbone": "mvit_v1_b"})
    with pytest.raises(ConfigError, match=r"max_frames \(8\) must be 0 or >= clip_len \(16\)"):
        create_extractor("clip", {"max_frames": 8})
    with pytest.raises(ConfigError, match="clips must be >= 1"):
        create_extractor("clip", {"clips": 0})
    with pytest.raises(ConfigError, match=r"extractor 'clip': weights 'NOPE' do not exist for 's3d'"):
        create_extractor("clip", {"backbone": "s3d", "weights": "NOPE"}).setup()
    with pytest.raises(ConfigError, match="extractor 'clip': weights file not found: /nonexistent/c.pt"):
        create_extractor("clip", {"weights": "/nonexistent/c.pt"}).setup()


# --- flow with RAFT -----------------------------------------------------------------------

RAFT = {"method": "raft", "size": 128, "raft_iters": 1, "seed": 0, **CPU}


def _raft_reference(frames, iters, seed=0):
    """torchvision's raft_small and its own OpticalFlow preset, one frame pair at a time."""
    import torch
    from torchvision.models.optical_flow import Raft_Small_Weights, raft_small

    torch.manual_seed(seed)
    model = raft_small(weights=None).eval()
    transforms = Raft_Small_Weights.C_T_V2.transforms()  # only its transforms: nothing is downloaded
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)
    flows = []
    with torch.no_grad():
        for i in range(len(video) - 1):
            first, second = transforms(video[i : i + 1], video[i + 1 : i + 2])
            flows.append(model(first, second, num_flow_updates=iters)[-1][0].permute(1, 2, 0).numpy())
    return flows  # (H, W, 2) each


def test_flow_raft_equals_torchvision_raft(shifted_frames_factory):
    gray = shifted_frames_factory(frames=3, size=128, dx=2.0, dy=-1.0)
    video = np.stack([gray, gray, 255 - gray], axis=-1)
    ex = create_extractor("flow", {**RAFT, "bins": 6})
    assert ex.decode_request() == {"gray": False, "size": 128, "max_frames": 32}
    out = ex.extract(video)
    for field, fs in ex.output_spec().items():
        fs.check(field, out[field])
    assert out["stats"].shape == (2, 10) and out["grid"].shape == (2, 2, 4, 4)
    for i, flow in enumerate(_raft_reference(video, iters=1)):
        dx, dy = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
        mag = np.hypot(dx, dy)
        hist, _ = np.histogram(
            np.mod(np.arctan2(dy, dx), 2 * np.pi), bins=6, range=(0, 2 * np.pi), weights=mag
        )
        np.testing.assert_allclose(
            out["stats"][i, :4], [dx.mean(), dy.mean(), mag.mean(), mag.std()], rtol=1e-3, atol=1e-4
        )
        np.testing.assert_allclose(out["stats"][i, 4:], hist / hist.sum(), atol=0.02)
        blocks = flow.reshape(4, 32, 4, 32, 2).mean(axis=(1, 3)).transpose(2, 0, 1)  # (2, 4, 4)
        np.testing.assert_allclose(out["grid"][i], blocks, rtol=1e-3, atol=1e-4)


def test_flow_raft_loads_local_checkpoint_and_is_deterministic(tmp_path, shifted_frames_factory):
    import torch
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(5)
    path = tmp_path / "raft.pt"
    torch.save(raft_small(weights=None).state_dict(), path)
    video = shifted_frames_factory(frames=2, size=128)  # gray frames: repeated into RGB
    loaded = create_extractor("flow", {**RAFT, "raft_weights": str(path)}).extract(video)
    seeded = create_extractor("flow", {**RAFT, "seed": 5}).extract(video)  # a fresh instance, same weights
    for field in ("stats", "grid"):
        np.testing.assert_array_equal(loaded[field], seeded[field])
    other = create_extractor("flow", {**RAFT, "seed": 6}).extract(video)
    assert not np.allclose(other["stats"], seeded["stats"])


def test_flow_raft_bad_configs_and_frame_sizes(shifted_frames_factory):
    for size in (100, 64):
        with pytest.raises(
            ConfigError,
            match=rf"method='raft' needs size to be 0 \(native\) or a multiple of 8 >= 128.*got {size}",
        ):
            create_extractor("flow", {"method": "raft", "size": size})
    with pytest.raises(ConfigError, match=r"method must be one of \('farneback', 'raft'\)"):
        create_extractor("flow", {"method": "lucas-kanade"})
    with pytest.raises(ConfigError, match=r"raft_model must be one of"):
        create_extractor("flow", {"method": "raft", "size": 128, "raft_model": "raft_huge"})
    with pytest.raises(ConfigError, match=r"extractor 'flow': weights 'NOPE' do not exist for 'raft_small'"):
        create_extractor("flow", {**RAFT, "raft_weights": "NOPE"}).setup()
    native = create_extractor("flow", {**RAFT, "size": 0})
    with pytest.raises(
        MediaError, match=r"RAFT needs frames whose sides are multiples of 8 and >= 128, got 130x130"
    ):
        native.extract(shifted_frames_factory(frames=2, size=130))


def test_flow_defaults_stay_farneback():
    ex = create_extractor("flow")
    assert ex.config.method == "farneback" and ex.decode_request()["gray"] is True
    ex.setup()  # builds no model
    assert ex._raft is None


# --- CUDA -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name, params",
    [
        ("frame_cnn", {"image_size": 64, "num_frames": 3}),
        ("clip", {"backbone": "r3d_18", "clip_len": 8, "image_size": 64, "clips": 2}),
        ("flow", {"method": "raft", "size": 128, "raft_iters": 4}),
    ],
)
def test_video_models_on_cuda_match_cpu(name, params, make_video):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    video = make_video(frames=4, height=128, width=128)
    on_cpu = create_extractor(name, {**params, "device": "cpu"}).extract(video)
    ex = create_extractor(name, {**params, "device": "auto"})
    on_gpu = ex.extract(video)
    for field, c in on_cpu.items():
        assert on_gpu[field].dtype == np.float32 and on_gpu[field].shape == c.shape
        # cuDNN may use TF32: close, not equal.
        scale = np.abs(c).max()
        np.testing.assert_allclose(on_gpu[field], c, rtol=2e-2, atol=2e-2 * scale)
