"""Where extraction inputs come from: a JSONL / CSV manifest, a directory, or WebDataset tars,
on a local disk or behind any fsspec URL (s3://, gs://, https://, memory://, file://).

Every source becomes a list of `SampleRecord`s (id, source, kind, optional clip window) with
absolute sources, so re-running from another working directory names the same samples (the
store refuses an id whose source changed). Local paths stay plain absolute paths; remote ones
stay URLs (a manifest's relative entries are joined to the manifest's own folder URL). A
WebDataset member is addressed as `TAR::MEMBER@OFFSET+SIZE`: scanning a tar reads its headers
through small range requests, and a decode task fetches exactly its member's byte range, so a
remote tar is never downloaded whole. `storage_options` (fsspec's, e.g. an S3 endpoint) apply to
every URL; the standard environment variables (AWS_*, GOOGLE_*) work as well.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merv import MervError
from merv.jsonl import JsonlLineError, jsonl_rows

if TYPE_CHECKING:  # decode tasks import this module: keep it free of torch (merv.store, webdataset)
    from merv.store import SampleRecord

VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif", ".flv", ".wmv", ".3gp"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
TAR_MEMBER_SEP = "::"
PATH_KEYS = ("path", "video", "image", "video_path", "image_path")
ID_KEYS = ("id", "video_id", "sample_id")


def base_plus_ext(name: str) -> tuple[str, str] | tuple[None, None]:
    """WebDataset's key / extension split (`webdataset.tariterators.base_plus_ext`; importing
    webdataset would pull torch into every decode task)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


class SourceError(MervError, ValueError):
    """A manifest / directory / tar that cannot be turned into samples; names the input."""


def kind_of(path: str) -> str | None:
    ext = os.path.splitext(path.lower())[1]
    if ext in VIDEO_EXTS:
        return "video"
    if ext in IMAGE_EXTS:
        return "image"
    return None


def _opt_float(v: Any) -> float | None:
    return None if v is None or str(v).strip().lower() in ("", "null", "none", "nan") else float(v)


def _opt_int(v: Any) -> int | None:
    return None if v is None or str(v).strip().lower() in ("", "null", "none") else int(float(v))


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = row.get(key)
        if value is not None and str(value) != "":
            return value
    return None


TAR_SCAN_BLOCK = 256 * 1024  # range-request size while walking a remote tar's headers
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> `pip install 'merv[...]'`


def is_url(path: str) -> bool:
    """An fsspec URL other than file:// (local paths and file:// URLs are read directly)."""
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path.removeprefix("file://")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL; a protocol whose package is missing is a
    SourceError naming the extra to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:  # fsspec: "Install s3fs to access S3"
        protocol = url.split("://", 1)[0]
        fix = f"pip install 'merv[{EXTRAS[protocol]}]'" if protocol in EXTRAS else f"install the fsspec backend for {protocol}://"
        raise SourceError(f"{url}: {protocol}:// needs a package that is not installed ({exc}); {fix}") from exc


@contextlib.contextmanager
def _reading(url: str) -> Iterator[None]:
    """Errors of reading a URL, as one SourceError naming it: a missing object, or credentials /
    endpoint / permissions (they come from many libraries: s3fs / botocore, aiohttp, gcsfs, ...,
    so they are told apart by kind, not by type)."""
    try:
        yield
    except (SourceError, MervError):
        raise
    except FileNotFoundError as exc:
        raise SourceError(f"{url}: no such object; check the URL") from exc
    except Exception as exc:  # noqa: BLE001 - everything else here is the user's endpoint, credentials or network
        raise SourceError(f"{url}: cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); check "
                          "the endpoint (AWS_ENDPOINT_URL or --storage-options), the credentials and the network") from exc


def _absolute(path: str, base: str) -> str:
    """A manifest entry made absolute against the manifest's folder `base` (a path or a URL)."""
    if "://" in path:
        return path
    if is_url(base):
        return path if path.startswith("/") else f"{base.rstrip('/')}/{path}"
    return os.path.abspath(path if os.path.isabs(path) else Path(base) / path)


def _parent(location: str) -> str:
    """The folder of a local path or a URL (a manifest's base for relative entries)."""
    if is_url(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return str(Path(os.path.abspath(_local(location))).parent)


def _record(row: Any, base: str, where: str) -> SampleRecord:
    from merv.store import SampleRecord

    if not isinstance(row, dict):
        raise SourceError(f"{where}: expected a JSON object with 'id' and 'path', got a {type(row).__name__}")
    path = _first(row, PATH_KEYS)
    if path is None:
        raise SourceError(f"{where}: no 'path' (or {', '.join(repr(k) for k in PATH_KEYS[1:])}) field")
    path = str(path)
    full = path if TAR_MEMBER_SEP in path else _absolute(path, base)
    sid = _first(row, ID_KEYS)
    sid = str(sid) if sid is not None else Path(path.split(TAR_MEMBER_SEP)[-1].split("@")[0]).stem
    kind = row.get("kind") or kind_of(path) or "video"
    try:
        return SampleRecord(sid, full, str(kind), _opt_float(row.get("start")), _opt_float(row.get("end")),
                            _opt_int(row.get("end_frame")))
    except ValueError as exc:
        raise SourceError(f"{where}: {exc}") from exc


def read_manifest(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> list[SampleRecord]:
    """CSV with a header, JSONL (one object per line) or a JSON list of objects, local or a URL.

    Fields: id, path (or video / image), optional kind, start, end (seconds), end_frame.
    Relative paths are relative to the manifest's directory. A manifest without samples is an
    error: an extraction of nothing is always a mistaken input.
    """
    p = os.fspath(path)
    if not is_url(p) and not Path(_local(p)).is_file():
        raise SourceError(f"manifest {p!r} does not exist")
    base = _parent(p)
    text = _manifest_text(p, storage_options)
    name = p.lower()
    if name.endswith(".csv"):
        records = [_record(row, base, f"{p}:{i}") for i, row in enumerate(csv.DictReader(io.StringIO(text)), start=2)]
    elif text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        records = [_record(row, base, f"{p}[{i}]") for i, row in enumerate(rows)]
    else:
        records = [_record(row, base, where) for row, where in _jsonl_rows(p, text)]
    if not records:
        raise SourceError(f"manifest {p} lists no samples; give one per line ({{\"id\": ..., \"path\": ...}})")
    return records


def _jsonl_rows(p: str, text: str) -> Iterator[tuple[Any, str]]:
    """(object, "file:line") of each non-blank JSONL line."""
    try:
        for i, row in jsonl_rows(text):
            yield row, f"{p}:{i}"
    except JsonlLineError as exc:
        raise SourceError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg}); a JSONL manifest has one object per line") from None


def _manifest_text(p: str, storage_options: dict[str, Any] | None = None) -> str:
    """A manifest's text; a file that is not UTF-8 is named (it is often a video or a tar given by mistake)."""
    if is_url(p):
        fs, inner = filesystem(p, storage_options)
        with _reading(p):
            raw = fs.cat_file(inner)
    else:
        raw = Path(_local(p)).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"manifest {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "pass a UTF-8 .jsonl / .json / .csv manifest, a directory of videos or .tar shards") from exc


def scan_directory(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> list[SampleRecord]:
    """Every video and image under a directory (sorted); the id is the relative path without extension."""
    from merv.store import SampleRecord

    p = os.fspath(path)
    if is_url(p):
        fs, root = filesystem(p, storage_options)
        with _reading(p):
            files = sorted(fs.find(root))
        found = [(f[len(root.rstrip("/")) + 1 :], fs.unstrip_protocol(f)) for f in files]
    else:
        local = Path(os.path.abspath(_local(p)))
        found = [(f.relative_to(local).as_posix(), str(f)) for f in sorted(local.rglob("*")) if f.is_file()]
    records = [SampleRecord(os.path.splitext(rel)[0], source, kind_of(rel)) for rel, source in found if kind_of(rel)]
    if not records:
        raise SourceError(f"directory {p!r} holds no videos ({', '.join(sorted(VIDEO_EXTS))}) or images")
    return records


@contextlib.contextmanager
def _open_binary(location: str, storage_options: dict[str, Any] | None) -> Iterator[Any]:
    """A seekable binary file: local, or remote with small range requests (tar headers are
    scattered through the file; big blocks would fetch the members in between)."""
    if not is_url(location):
        with open(_local(location), "rb") as fh:
            yield fh
        return
    fs, inner = filesystem(location, storage_options)
    with _reading(location), fs.open(inner, "rb", block_size=TAR_SCAN_BLOCK, cache_type="readahead") as fh:
        yield fh


def scan_tar(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> list[SampleRecord]:
    """A WebDataset shard: members grouped by key; one video or image member plus an optional
    .json (id, kind, start, end, end_frame) per key. One pass over the headers (seeking over the
    members' data); json members are read by offset."""
    p = os.fspath(path)
    location = p if is_url(p) else os.path.abspath(_local(p))
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    records = []
    with _open_binary(location, storage_options) as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                for info in tar:
                    key, ext = base_plus_ext(info.name) if info.isfile() else (None, None)
                    if key is None or ext is None:
                        continue
                    groups.setdefault(key, {})[ext.lower()] = info
        except (tarfile.TarError, OSError) as exc:
            raise SourceError(f"{location!r} is not a readable tar ({exc})") from exc
        for key, members in groups.items():  # dicts keep the tar's order
            media = [(ext, m) for ext, m in members.items() if kind_of("x." + ext)]
            if not media:
                continue
            ext, info = media[0]
            meta: dict[str, Any] = {}
            if "json" in members:
                js = members["json"]
                fh.seek(js.offset_data)
                try:
                    meta = json.loads(fh.read(js.size))
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{location}: member {js.name!r} is not valid JSON ({exc.msg})") from exc
            source = f"{location}{TAR_MEMBER_SEP}{info.name}@{info.offset_data}+{info.size}"
            row = {**meta, "path": source, "kind": meta.get("kind") or kind_of("x." + ext)}
            row.setdefault("id", key)
            records.append(_record(row, "/", f"{location}:{key}"))
    return records


def _expand(part: str, storage_options: dict[str, Any] | None) -> list[str]:
    """A glob (or a single path / URL) -> the matching files, sorted, as paths or URLs."""
    if is_url(part):
        fs, inner = filesystem(part, storage_options)
        with _reading(part):
            return [fs.unstrip_protocol(m) for m in sorted(fs.glob(inner))]
    return sorted(glob.glob(_local(part)))


def discover(source: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> list[SampleRecord]:
    """Samples of any supported source: a manifest, a directory, a tar, or a glob / comma list of
    tars (in the order given, each glob sorted), each a local path or an fsspec URL."""
    s = os.fspath(source)
    if any(ch in s for ch in "*?[") or "," in s:
        # the list's order, each glob sorted: the sample order (and so shard contents) is reproducible
        tars = list(dict.fromkeys(p for part in s.split(",") if part.strip() for p in _expand(part.strip(), storage_options)))
        if not tars:
            raise SourceError(f"{s!r} matches no files")
        return [r for t in tars for r in scan_tar(t, storage_options)]
    if is_url(s):
        fs, inner = filesystem(s, storage_options)
        with _reading(s):
            is_dir, exists = fs.isdir(inner), fs.exists(inner)
    else:
        is_dir, exists = Path(_local(s)).is_dir(), Path(_local(s)).exists()
    if is_dir:
        return scan_directory(s, storage_options)
    if not exists:
        raise SourceError(f"source {s!r} does not exist (give a manifest .jsonl/.csv, a directory, or .tar shards)")
    suffix = os.path.splitext(s.lower())[1]
    if suffix == ".tar":
        return scan_tar(s, storage_options)
    if suffix in (".jsonl", ".json", ".csv"):
        return read_manifest(s, storage_options)
    raise SourceError(f"source {s!r}: unknown type; expected a .jsonl/.json/.csv manifest, a directory or .tar shards")


def split_tar_source(source: str) -> tuple[str, str, int, int]:
    """(tar path, member name, data offset, size) of a `TAR::MEMBER@OFFSET+SIZE` source."""
    tar_path, rest = source.rsplit(TAR_MEMBER_SEP, 1)  # a chained fsspec URL has "::" of its own
    member, _, span = rest.rpartition("@")
    offset, size = (int(v) for v in span.split("+"))
    return tar_path, member, offset, size


def read_bytes(source: str, storage_options: dict[str, Any] | None = None, start: int | None = None,
               end: int | None = None) -> bytes:
    """The bytes of a local file or an fsspec URL, optionally one byte range (a tar member)."""
    if not is_url(source):
        with open(_local(source), "rb") as fh:
            fh.seek(start or 0)
            return fh.read() if end is None else fh.read(end - (start or 0))
    fs, inner = filesystem(source, storage_options)
    with _reading(source):
        return fs.cat_file(inner, start=start, end=end)


@contextlib.contextmanager
def local_file(source: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local path for a sample's source. Decoders need a seekable file with the right suffix:
    tar members (their byte range only) and remote (fsspec) URLs are copied to a temporary file
    for the duration."""
    if TAR_MEMBER_SEP in source:
        tar_path, member, offset, size = split_tar_source(source)
        data = read_bytes(tar_path, storage_options, offset, offset + size)
        if len(data) != size:
            raise SourceError(f"{tar_path!r}: member {member!r} is truncated ({len(data)} of {size} bytes)")
        suffix = os.path.splitext(member)[1]
    elif is_url(source):
        data = read_bytes(source, storage_options)
        suffix = os.path.splitext(source)[1]
    else:
        yield _local(source)
        return
    tmp = tempfile.NamedTemporaryFile(prefix="merv-", suffix=suffix, delete=False)
    try:
        tmp.write(data)
        tmp.close()
        yield tmp.name
    finally:
        os.unlink(tmp.name)
