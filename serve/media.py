"""A chat message's visual part (`image_url` / `video_url`) as a local file, within the limits.

Accepted: a local path, a `file://` URL, or a base64 `data:` URL (written to a temporary file named
by its media type). Remote http(s) URLs are refused: the server never fetches on a client's behalf.
Every problem is a `MediaError` carrying the HTTP status to answer with.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from merv import MervError

SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/x-matroska": ".mkv", "video/quicktime": ".mov",
            "video/x-msvideo": ".avi", "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp",
            "image/bmp": ".bmp"}


class MediaError(MervError, ValueError):
    """A visual input the server refuses; `status` is the HTTP answer (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def local_media(url: str, *, max_bytes: int, allow_local_files: bool) -> Iterator[Path]:
    """The visual input behind `url` as a local file for the duration of the block."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise MediaError("a data URL must be base64: data:<media type>;base64,<data>")
        media_type = header[len("data:"):].split(";")[0].strip().lower()
        if media_type not in SUFFIXES:
            raise MediaError(f"media type {media_type!r} is not a video or image type this server reads "
                             f"({', '.join(sorted(SUFFIXES))})")
        if len(payload) * 3 // 4 > max_bytes:
            raise MediaError(f"the upload is larger than the server's limit of {max_bytes} bytes", status=413)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"the data URL is not valid base64 ({exc})") from None
        fd, name = tempfile.mkstemp(prefix="merv-serve-", suffix=SUFFIXES[media_type])
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)
        return
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "s3", "gs", "ftp"):
        raise MediaError(f"{parsed.scheme}:// URLs are not fetched by the server; send the file as a base64 data URL")
    if not allow_local_files:
        raise MediaError("this server does not read local paths (started with --no-local-files); send a base64 data URL")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
    if not path.is_file():
        raise MediaError(f"{path}: no such file on the server")
    if path.stat().st_size > max_bytes:
        raise MediaError(f"{path} is larger than the server's limit of {max_bytes} bytes", status=413)
    yield path


def check_video(path: Path, *, max_seconds: float, max_frames: int) -> None:
    """Refuse a video longer than the limits before any frame is decoded (images pass)."""
    from merv.extract.video import IMAGE_SUFFIXES

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return  # decoding names the problem
            stream = container.streams.video[0]
            seconds = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                       else (container.duration or 0) / 1e6)
            frames = int(stream.frames or 0)
    except Exception:  # noqa: BLE001 - not a readable container: decoding gives the precise reason
        return
    if seconds > max_seconds:
        raise MediaError(f"the video lasts {seconds:.0f} s, over the server's limit of {max_seconds:.0f} s")
    if frames > max_frames:
        raise MediaError(f"the video has {frames} frames, over the server's limit of {max_frames}")
