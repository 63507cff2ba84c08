"""The zarr v3 feature store: the spine between extraction and training.

See `FeatureStore` (create / open, sample table, encoder groups), `EncoderGroup.write_shard`
(atomic shard commit), `FeatureReader` (random access and shard streaming) and
`verify_store` / `store_info`. This package imports nothing from `merv.extract` or `merv.train`.
"""

from .errors import (
    AmbiguousEncoderError,
    FingerprintMismatchError,
    IncompatibleStoreError,
    NotAStoreError,
    SampleNotFoundError,
    SampleUnavailableError,
    StoreError,
    StoreExistsError,
    StoreNotFoundError,
    UnknownEncoderError,
)
from .group import EncoderGroup
from .inspect import VerifyReport, store_info, verify_store
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
    "AmbiguousEncoderError", "CommitRecord", "DEFAULT_SHARD_BYTES", "EncoderGroup", "EncoderGroupSpec",
    "FeatureReader", "FeatureStore", "FingerprintMismatchError", "IncompatibleStoreError", "KINDS",
    "NotAStoreError", "SampleNotFoundError", "SampleRecord", "SampleTable", "SampleUnavailableError",
    "ShardBatch", "StoreError", "StoreExistsError", "StoreMeta", "StoreNotFoundError", "UnknownEncoderError",
    "VerifyReport", "choose_samples_per_shard", "fingerprint_of", "parse_grid", "store_info", "verify_store",
]
