"""Where extraction inputs come from: a JSONL / CSV manifest, a directory, or WebDataset tars.

Every source becomes a list of `SampleRecord`s (id, source, kind, optional clip window) with
absolute sources, so re-running from another working directory names the same samples (the
store refuses an id whose source changed). A WebDataset member is addressed as
`TAR::MEMBER@OFFSET+SIZE` so a decode task reads just its bytes without scanning the tar again.
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


def _absolute(path: str, base: Path) -> str:
    if "://" in path:
        return path
    return os.path.abspath(path if os.path.isabs(path) else base / path)


def _record(row: Any, base: Path, where: str) -> SampleRecord:
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


def read_manifest(path: str | os.PathLike[str]) -> list[SampleRecord]:
    """CSV with a header, JSONL (one object per line) or a JSON list of objects.

    Fields: id, path (or video / image), optional kind, start, end (seconds), end_frame.
    Relative paths are relative to the manifest's directory. A manifest without samples is an
    error: an extraction of nothing is always a mistaken input.
    """
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"manifest {str(p)!r} does not exist")
    base = p.parent
    text = _manifest_text(p)
    if p.suffix.lower() == ".csv":
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


def _jsonl_rows(p: Path, text: str) -> Iterator[tuple[Any, str]]:
    """(object, "file:line") of each non-blank JSONL line."""
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{p}:{i}: not valid JSON ({exc.msg}); a JSONL manifest has one object per line") from exc
        yield row, f"{p}:{i}"


def _manifest_text(p: Path) -> str:
    """A manifest's text; a file that is not UTF-8 is named (it is often a video or a tar given by mistake)."""
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"manifest {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "pass a UTF-8 .jsonl / .json / .csv manifest, a directory of videos or .tar shards") from exc


def scan_directory(path: str | os.PathLike[str]) -> list[SampleRecord]:
    """Every video and image under a directory (sorted); the id is the relative path without extension."""
    from merv.store import SampleRecord

    root = Path(os.path.abspath(path))
    records = []
    for f in sorted(root.rglob("*")):
        kind = kind_of(f.name)
        if kind and f.is_file():
            records.append(SampleRecord(f.relative_to(root).with_suffix("").as_posix(), str(f), kind))
    if not records:
        raise SourceError(f"directory {str(root)!r} holds no videos ({', '.join(sorted(VIDEO_EXTS))}) or images")
    return records


def scan_tar(path: str | os.PathLike[str]) -> list[SampleRecord]:
    """A WebDataset shard: members grouped by key; one video or image member plus an optional
    .json (id, kind, start, end, end_frame) per key. One pass over the headers; json members are
    read by offset."""
    path = os.path.abspath(path)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, ext = base_plus_ext(info.name) if info.isfile() else (None, None)
                if key is None or ext is None:
                    continue
                groups.setdefault(key, {})[ext.lower()] = info
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{path!r} is not a readable tar ({exc})") from exc
    records = []
    with open(path, "rb") as fh:
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
                    raise SourceError(f"{path}: member {js.name!r} is not valid JSON ({exc.msg})") from exc
            source = f"{path}{TAR_MEMBER_SEP}{info.name}@{info.offset_data}+{info.size}"
            row = {**meta, "path": source, "kind": meta.get("kind") or kind_of("x." + ext)}
            row.setdefault("id", key)
            records.append(_record(row, Path("/"), f"{path}:{key}"))
    return records


def discover(source: str | os.PathLike[str]) -> list[SampleRecord]:
    """Samples of any supported source: a manifest, a directory, a tar, or a glob / comma list of tars
    (in the order given, each glob sorted)."""
    s = os.fspath(source)
    if any(ch in s for ch in "*?[") or "," in s:
        # the list's order, each glob sorted: the sample order (and so shard contents) is reproducible
        tars = list(dict.fromkeys(p for part in s.split(",") if part.strip() for p in sorted(glob.glob(part.strip()))))
        if not tars:
            raise SourceError(f"{s!r} matches no files")
        return [r for t in tars for r in scan_tar(t)]
    if "://" in s and not s.startswith("file://"):
        raise SourceError(f"source {s!r}: manifests, directories and tars are read from local paths; copy it here "
                          "(the videos a manifest lists may be fsspec URLs)")
    p = Path(s.removeprefix("file://"))
    if p.is_dir():
        return scan_directory(p)
    if not p.exists():
        raise SourceError(f"source {s!r} does not exist (give a manifest .jsonl/.csv, a directory, or .tar shards)")
    suffix = p.suffix.lower()
    if suffix == ".tar":
        return scan_tar(p)
    if suffix in (".jsonl", ".json", ".csv"):
        return read_manifest(p)
    raise SourceError(f"source {s!r}: unknown type; expected a .jsonl/.json/.csv manifest, a directory or .tar shards")


def split_tar_source(source: str) -> tuple[str, str, int, int]:
    """(tar path, member name, data offset, size) of a `TAR::MEMBER@OFFSET+SIZE` source."""
    tar_path, rest = source.split(TAR_MEMBER_SEP, 1)
    member, _, span = rest.rpartition("@")
    offset, size = (int(v) for v in span.split("+"))
    return tar_path, member, offset, size


def _fetch(url: str) -> bytes:
    """The bytes behind an fsspec URL; a missing backend, a missing object or an unreachable
    endpoint becomes a `SourceError` naming the URL and the fix (network errors come from many
    libraries: s3fs / botocore, aiohttp, gcsfs, ... so they are told apart by kind, not by type)."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as fh:
            return fh.read()
    except ImportError as exc:  # fsspec: "Install s3fs to access S3"
        raise SourceError(f"{url}: {exc} (pip install it), or pass a local copy of the file") from exc
    except FileNotFoundError as exc:
        raise SourceError(f"{url}: no such object; check the URL") from exc
    except Exception as exc:  # noqa: BLE001 - credentials, endpoint, permissions: all the user's to fix
        raise SourceError(f"{url}: cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                          "check the endpoint (AWS_ENDPOINT_URL), the credentials and the network") from exc


@contextlib.contextmanager
def local_file(source: str) -> Iterator[str]:
    """A local path for a sample's source. Decoders need a seekable file with the right suffix:
    tar members and remote (fsspec) URLs are copied to a temporary file for the duration."""
    if TAR_MEMBER_SEP in source:
        tar_path, member, offset, size = split_tar_source(source)
        with open(tar_path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise SourceError(f"{tar_path!r}: member {member!r} is truncated ({len(data)} of {size} bytes)")
        suffix = os.path.splitext(member)[1]
    elif "://" in source and not source.startswith("file://"):
        data = _fetch(source)
        suffix = os.path.splitext(source)[1]
    else:
        yield source[len("file://"):] if source.startswith("file://") else source
        return
    tmp = tempfile.NamedTemporaryFile(prefix="merv-", suffix=suffix, delete=False)
    try:
        tmp.write(data)
        tmp.close()
        yield tmp.name
    finally:
        os.unlink(tmp.name)
