"""The project's exceptions: one base class, a few precise subclasses.

Every message names the object, the offending value and what to do about it.
"""

from __future__ import annotations


class ModalstoreError(Exception):
    """Base class of every error modalstore raises on purpose."""


class ConfigError(ModalstoreError, ValueError):
    """A configuration file or value is invalid."""


class ManifestError(ModalstoreError, ValueError):
    """An input manifest is malformed (names file, row and column)."""


class MediaError(ModalstoreError):
    """A media file cannot be read or decoded."""


class ExtractionError(ModalstoreError):
    """An extractor failed on one sample."""


class StoreError(ModalstoreError):
    """A feature store is missing, incomplete or inconsistent."""


class ShardFormatError(StoreError):
    """A shard member is malformed or not allowed (names shard and member)."""


class MissingDependencyError(ModalstoreError, ImportError):
    """An optional dependency is not installed (names the pip extra)."""


def require(module: str, extra: str):
    """Import ``module`` or raise naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module!r} is not installed; install it with: pip install 'modalstore[{extra}]'"
        ) from exc
