"""The shard-set format: manifest, card, tar shards with their DALI indexes, the sample index;
where a set is (a folder or a URL), fetching it, and the one way to open and check it.

``jigsawdata.shardset.fetch`` is the download module (``fetch.fetch``, ``jigsawdata fetch``).
"""

from .check import check_shard_set, summarize, verify_shard_set
from .grouping import GROUPS, group_of
from .location import ShardLocation, is_url
from .manifest import Manifest, ManifestError, read_manifest
from .open import GroupShards, ShardSet, as_shard_set, local_copy, open_shard_set, read_shard_set

__all__ = [
    "GROUPS",
    "GroupShards",
    "Manifest",
    "ManifestError",
    "ShardLocation",
    "ShardSet",
    "as_shard_set",
    "check_shard_set",
    "group_of",
    "is_url",
    "local_copy",
    "open_shard_set",
    "read_manifest",
    "read_shard_set",
    "summarize",
    "verify_shard_set",
]
