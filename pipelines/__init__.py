"""Pipelines: manifests, configs, media decoding, Dask orchestration, shard writing and the store."""
