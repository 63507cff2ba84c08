"""Typed errors of the feature store: each names the input at fault and how to fix it."""

from __future__ import annotations

from typing import Any

from merv import MervError


class StoreError(MervError):
    """Base class of every feature-store error."""


class StoreNotFoundError(StoreError):
    def __init__(self, url: str) -> None:
        super().__init__(
            f"no feature store at {url!r}: the path does not exist. "
            "Create one with `merv extract ... --store PATH` or FeatureStore.create(PATH)."
        )
        self.url = url


class NotAStoreError(StoreError):
    def __init__(self, url: str, why: str) -> None:
        super().__init__(
            f"{url!r} is not a MERV feature store ({why}). "
            "Point --store at a directory created by `merv extract`, or pick a new path."
        )
        self.url = url


class StoreExistsError(StoreError):
    def __init__(self, url: str) -> None:
        super().__init__(
            f"a feature store already exists at {url!r}; open it instead, or pass overwrite=True "
            "(--overwrite) to replace it."
        )
        self.url = url


class UnknownEncoderError(StoreError):
    def __init__(self, url: str, name: str, available: list[str]) -> None:
        have = ", ".join(available) if available else "none"
        super().__init__(
            f"encoder {name!r} is not in the store {url!r} (encoder groups present: {have}). "
            f"Extract it with `merv extract ... --encoders {name if ':' in name else name.split('-')[0]}` or choose one of those present."
        )
        self.name = name


class AmbiguousEncoderError(StoreError):
    def __init__(self, url: str, name: str, keys: list[str]) -> None:
        super().__init__(
            f"the store {url!r} holds several configurations of encoder {name!r}: {', '.join(keys)}. "
            "Name the one to use by its full key."
        )


class FingerprintMismatchError(StoreError):
    def __init__(self, url: str, name: str, expected: str, found: list[str]) -> None:
        super().__init__(
            f"encoder {name!r} in store {url!r} was extracted with a different configuration: "
            f"expected fingerprint {expected}, store has {', '.join(found) or 'none'}. "
            "The cached numbers would not match your config; re-extract with this config "
            "(it adds a new group next to the old one) or use the config the store was made with."
        )


class IncompatibleStoreError(StoreError):
    """An operation asks for a layout the existing store was not created with."""


class SampleNotFoundError(StoreError, KeyError):
    def __init__(self, url: str, sample_id: str) -> None:
        super().__init__(
            f"sample id {sample_id!r} is not in the store {url!r}. Check the id against the "
            "instruction data / manifest, or extract the missing videos first."
        )
        self.sample_id = sample_id

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class SampleUnavailableError(StoreError):
    """A sample exists in the table but has no committed data for an encoder (pending or failed)."""

    def __init__(self, sample_id: str, encoder: str, state: str, reason: str | None = None) -> None:
        detail = f": {reason}" if reason else ""
        hint = (
            "re-run `merv extract` with --retry-failed after fixing the source"
            if state == "failed"
            else "finish the extraction (`merv extract` resumes where it stopped)"
        )
        super().__init__(f"sample {sample_id!r} is {state} for encoder {encoder!r}{detail}; {hint}.")
        self.sample_id = sample_id
        self.encoder = encoder
        self.state = state
        self.reason = reason


def _shown(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def commit_record_url(url: str, group: str, kind: str, shard: int) -> str:
    """Where a shard's commit record lives (deleting it makes the next `merv extract` redo the shard)."""
    return f"{url.rstrip('/')}/{group}/commits/{kind}/{shard:08d}.json"


class StoreDataError(StoreError):
    """Committed data that cannot be returned as stored: where it is, and how to get it back.

    Constructible from one message string (as torch's DataLoader re-raises a worker's exception
    with `type(exc)(message)`); `at()` builds the message from the location, `located()` adds to
    it as the error travels up (array -> encoder group -> reader with sample ids).
    """

    def __init__(self, message: str, *, problem: str = "", where: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.problem = problem or message
        self.where: dict[str, Any] = dict(where or {})

    @property
    def shard(self) -> int | None:
        return self.where.get("shard")

    @property
    def rows(self) -> list[int]:
        return list(self.where.get("rows", []))

    @property
    def samples(self) -> list[str]:
        return list(self.where.get("samples", []))

    @classmethod
    def at(cls, problem: str, **where: Any) -> "StoreDataError":
        return cls(cls._compose(problem, where), problem=problem, where=where)

    def located(self, **more: Any) -> "StoreDataError":
        """The same error with more of its location known (store, group, kind, sample ids)."""
        where = {**self.where, **{k: v for k, v in more.items() if v is not None}}
        return type(self).at(self.problem, **where)

    @staticmethod
    def _compose(problem: str, where: dict[str, Any]) -> str:
        url, group, kind, shard = (where.get(k) for k in ("url", "group", "kind", "shard"))
        place = [f"store {url!r}" if url else "", f"encoder group {group!r}" if group else "",
                 f"{kind or 'kind ?'} shard {shard}" if shard is not None else ""]
        who = ""
        if where.get("samples"):
            who = f"; samples affected: {_shown([str(s) for s in where['samples']])}"
        elif where.get("rows"):
            who = f"; rows affected: {_shown([str(r) for r in where['rows']])}"
        fix = ""
        if url and group and kind and shard is not None:
            fix = (f". Run `merv store verify {url}` to list every damaged shard, then delete each one's commit "
                   f"record (here {commit_record_url(url, group, kind, int(shard))}) and re-run the same `merv extract` "
                   "command: it redoes every shard without a commit record (--retry-failed only redoes recorded failures)")
        return f"{', '.join(p for p in place if p) or 'feature store'}: {problem}{who}{fix}"


class MissingShardDataError(StoreDataError):
    """A committed shard's object, or a chunk inside it, is gone: reading it would give fill values."""


class ChunkChecksumError(StoreDataError, ValueError):
    """A stored chunk or shard index whose crc32c does not match its bytes."""


class StoreMetadataError(StoreError):
    """A metadata document (zarr.json, or MERV's attributes in it) that cannot be used; names the file."""

    def __init__(self, message: str, *, file: str = "") -> None:
        super().__init__(message)
        self.file = file

    @classmethod
    def of(cls, file: str, why: str, group_dir: str | None = None) -> "StoreMetadataError":
        """`group_dir`: the encoder group folder the file belongs to (it can be rebuilt alone)."""
        why = " ".join(str(why).split())[:300]
        fix = (f"delete the encoder group folder {group_dir} and re-run `merv extract` for that encoder "
               "(the store's other groups are not touched)" if group_dir else
               "restore it from a copy of the store, or extract into a new store (this file holds the "
               "store's settings or its sample table)")
        return cls(f"{file} is corrupt or not a MERV store document ({why}); {fix}", file=file)


class StoreBusyError(StoreError):
    """Another process holds the lease that an operation needs (and kept it past the wait)."""

    def __init__(self, message: str, *, owner: str = "", key: str = "") -> None:
        super().__init__(message)
        self.owner = owner
        self.key = key


class LeaseLostError(StoreError):
    """A lease this process held expired or was taken over; its work must not be committed."""


class StoreAccessError(StoreError):
    """A store behind an fsspec URL cannot be reached: its filesystem package is missing, or the
    endpoint, credentials or network refuse. The message names the URL and what to check."""
