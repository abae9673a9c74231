"""Optional TensorBoard logging: the event files hold exactly the numbers of the JSONL logs."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from features.errors import ConfigError  # noqa: E402
from fusion.train import RunSpec, TrainConfig, train_one  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(runs_dir, **kw) -> TrainConfig:
    base = dict(
        store="fake-store",
        runs_dir=str(runs_dir),
        groups=["image", "audio"],
        models=["late_fusion"],
        epochs=2,
        batch_size=32,
        hidden=8,
        grad_clip=1.0,  # grad_norm in the step rows too
        device="cpu",
        tensorboard=True,
    )
    return TrainConfig(**{**base, **kw})


def _scalars(tb_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = {e.step: e.value for e in events}
        assert len(out[tag]) == len(events), f"{tag}: a step logged twice"
    return out


def _expected(run_dir) -> dict[str, dict[int, float]]:
    want: dict[str, dict[int, float]] = {}
    for name, prefix in (("steps.jsonl", "step"), ("log.jsonl", "epoch")):
        for line in (run_dir / name).read_text().splitlines():
            row = json.loads(line)
            for key, value in row.items():
                if key not in ("step", "epoch", "phase"):
                    want.setdefault(f"{prefix}/{key}", {})[row["step"]] = value
    return want


def _assert_same(got, want) -> None:
    assert set(got) == set(want)
    for tag, values in want.items():
        assert set(got[tag]) == set(values), tag
        for step, value in values.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)  # float32


RUN = RunSpec("late_fusion", "late_fusion", ("image", "audio"))


def test_event_files_hold_the_jsonl_values(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(sizes={"train": 96, "val": 32, "test": 32})
    out = train_one(_config(tmp_path), RUN, factory, progress=False)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    got, want = _scalars(out / "tb"), _expected(out)
    assert {"step/loss", "step/lr", "step/grad_norm", "epoch/val_acc", "epoch/train_loss"} <= set(want)
    assert len(want["step/loss"]) == 2 * 3 and len(want["epoch/val_acc"]) == 2  # 3 steps per epoch
    _assert_same(got, want)

    # A fresh run into the same folder: its JSONL logs start over, and so does what TensorBoard shows.
    out = train_one(_config(tmp_path, epochs=1, lr=3e-3), RUN, factory, progress=False)
    got, want = _scalars(out / "tb"), _expected(out)
    assert len(want["epoch/val_acc"]) == 1
    _assert_same(got, want)


def test_resume_hides_what_a_killed_run_logged_past_its_checkpoint(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(sizes={"train": 96, "val": 32, "test": 32})
    out = tmp_path / RUN.name

    def keep_epoch1_checkpoint(split, groups, shuffle):
        loader = factory(split, groups, shuffle)
        if split == "train":
            set_epoch = loader.set_epoch

            def hooked(epoch):
                if epoch == 2:
                    shutil.copyfile(out / "last.pt", tmp_path / "last-epoch1.pt")
                set_epoch(epoch)

            loader.set_epoch = hooked
        return loader

    train_one(_config(tmp_path), RUN, keep_epoch1_checkpoint, progress=False)
    # As if killed after logging epoch 2 but before its checkpoint: logs of 2 epochs, last.pt of 1.
    shutil.copyfile(tmp_path / "last-epoch1.pt", out / "last.pt")
    train_one(_config(tmp_path), RUN, factory, progress=False, resume=True)
    got, want = _scalars(out / "tb"), _expected(out)
    assert len(want["epoch/val_acc"]) == 2
    _assert_same(got, want)  # epoch 2 once, as retrained, not twice


def test_tensorboard_off_writes_no_events(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(sizes={"train": 32, "val": 32, "test": 32})
    out = train_one(_config(tmp_path, epochs=1, tensorboard=False), RUN, factory, progress=False)
    assert not (out / "tb").exists()


def test_missing_package_fails_at_validation_naming_key_and_fix(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"TrainConfig\.tensorboard: .*pip install 'modalstore\[tensorboard\]'"
    ):
        _config(tmp_path)
    _config(tmp_path, tensorboard=False)  # off: no package needed
