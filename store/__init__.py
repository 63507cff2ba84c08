"""The zarr v3 feature store: the spine between extraction and training.

See `FeatureStore` (create / open, sample table, encoder groups), `EncoderGroup.write_shard`
(atomic shard commit), `FeatureReader` (random access and shard streaming) and
`verify_store` / `store_info`, and `merv.store.lease` (one writer per shard, the store's
metadata lock). This package imports nothing from `merv.extract` or `merv.train`.
"""

from .errors import (
    AmbiguousEncoderError,
    ChunkChecksumError,
    FingerprintMismatchError,
    IncompatibleStoreError,
    LeaseLostError,
    MissingShardDataError,
    NotAStoreError,
    SampleNotFoundError,
    SampleUnavailableError,
    StoreAccessError,
    StoreBusyError,
    StoreDataError,
    StoreError,
    StoreExistsError,
    StoreMetadataError,
    StoreNotFoundError,
    UnknownEncoderError,
)
from .group import EncoderGroup
from .inspect import VerifyReport, store_info, verify_store
from .lease import HeldBy, Lease
from .reader import FeatureReader, ShardBatch
from .samples import SampleRecord, SampleTable
from .schema import (
    DEFAULT_SHARD_BYTES,
    KINDS,
    CommitRecord,
    EncoderGroupSpec,
    StoreMeta,
    choose_samples_per_shard,
    fingerprint_of,
    parse_grid,
)
from .store import FeatureStore

__all__ = [
    "AmbiguousEncoderError", "ChunkChecksumError", "CommitRecord", "DEFAULT_SHARD_BYTES", "EncoderGroup",
    "EncoderGroupSpec", "FeatureReader", "FeatureStore", "FingerprintMismatchError", "HeldBy", "IncompatibleStoreError",
    "KINDS", "Lease", "LeaseLostError", "MissingShardDataError", "NotAStoreError", "SampleNotFoundError", "SampleRecord",
    "SampleTable", "SampleUnavailableError", "StoreAccessError", "ShardBatch", "StoreBusyError", "StoreDataError", "StoreError",
    "StoreExistsError", "StoreMeta", "StoreMetadataError", "StoreNotFoundError", "UnknownEncoderError",
    "VerifyReport", "choose_samples_per_shard", "fingerprint_of", "parse_grid", "store_info", "verify_store",
]
