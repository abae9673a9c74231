"""Shared fixture factories: small synthetic media, in memory or written to ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


from media_factories import (  # noqa: E402,F401
    make_audio,
    make_image,
    make_media,
    make_shifted_frames,
    write_m4a,
    write_mp4,
    write_png,
    write_wav,
)


@pytest.fixture
def media_factory():
    return make_media


@pytest.fixture
def image_factory():
    return make_image


@pytest.fixture
def audio_factory():
    return make_audio


@pytest.fixture
def shifted_frames_factory():
    return make_shifted_frames


@pytest.fixture
def media_files(tmp_path):
    """Writers bound to ``tmp_path``: ``media_files.png("a.png", image)`` returns the path."""

    class Writers:
        def png(self, name: str, image: np.ndarray, mode: str | None = None) -> Path:
            return write_png(tmp_path / name, image, mode)

        def wav(self, name: str, audio: np.ndarray, sample_rate: int) -> Path:
            return write_wav(tmp_path / name, audio, sample_rate)

        def mp4(self, name: str, frames: np.ndarray, fps: int = 10, crf: int = 12) -> Path:
            return write_mp4(tmp_path / name, frames, fps, crf)

        def m4a(self, name: str, audio: np.ndarray, sample_rate: int) -> Path:
            return write_m4a(tmp_path / name, audio, sample_rate)

        def text(self, name: str, content: str = "this is not media\n") -> Path:
            path = tmp_path / name
            path.write_text(content)
            return path

    return Writers()


@pytest.fixture
def shared_data():
    """The shared real-data folder (``../shared/data`` from the project root), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


from store_fixtures import demo_dir, tiny_store  # noqa: E402,F401  (session fixtures shared by all tests)


def pytest_configure(config):
    # The suite's models are tiny: on a 2-core machine one torch thread is faster than two
    # (thread hand-offs dominate) and leaves the second core to Dask workers and DataLoaders.
    import torch

    torch.set_num_threads(1)
