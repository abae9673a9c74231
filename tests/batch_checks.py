"""Comparing loader batches: the same keys, labels and tensors, bit for bit."""

import torch


def assert_same_batches(got, want):
    """``got`` and ``want`` (lists of StreamingLoader batches) are equal: keys, labels, and every
    feature, length, mask and presence tensor with the same dtype, shape and bytes."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["label"], b["label"])
        for part in ("features", "lengths", "mask", "present"):
            assert a[part].keys() == b[part].keys()
            for name in a[part]:
                x, y = a[part][name].cpu(), b[part][name].cpu()
                assert x.dtype == y.dtype and x.shape == y.shape, (part, name)
                assert x.numpy().tobytes() == y.numpy().tobytes(), (part, name)  # bit-identical
