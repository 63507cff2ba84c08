"""Typed errors of the feature store: each names the input at fault and how to fix it."""

from __future__ import annotations

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
            f"Extract it with `merv extract ... --encoders {name.split('-')[0]}` or choose one of those present."
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
