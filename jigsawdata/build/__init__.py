"""Building a shard set from a COCO-format set: crop geometry, sampling, staging, shards, merge."""

from .merge import merge_parts
from .run import BuildConfig, build_shards
from .sampling import SamplingConfig

__all__ = ["BuildConfig", "SamplingConfig", "build_shards", "merge_parts"]
