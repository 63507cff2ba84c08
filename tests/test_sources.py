"""Extraction sources: manifests (JSONL, JSON list, CSV), directories, WebDataset tars."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from merv.extract.sources import SourceError, discover, local_file, read_manifest, scan_directory, scan_tar


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_jsonl_manifest_fields_windows_and_absolute_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    lines = [
        {"id": "a", "path": "sub/a.mp4", "start": 1.5, "end": "3"},
        {"video_id": 0, "video": "/data/b.webm", "end_frame": 40},
        {"path": "c.JPG"},
        {"id": "d", "path": "d.bin", "kind": "image", "start": None, "end": ""},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = read_manifest(manifest)
    assert [r.id for r in recs] == ["a", "0", "c", "d"]
    assert recs[0].source == str(tmp_path / "sub" / "a.mp4") and (recs[0].start, recs[0].end) == (1.5, 3.0)
    assert recs[1].source == "/data/b.webm" and recs[1].end_frame == 40 and recs[1].kind == "video"
    assert recs[2].kind == "image" and recs[2].source == str(tmp_path / "c.JPG")
    assert recs[3].kind == "image" and recs[3].start is None and recs[3].end is None


def test_manifest_is_read_the_same_from_any_working_directory(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "path": "a.mp4"}) + "\n")
    code = "from merv.extract.sources import read_manifest; print(read_manifest('m.jsonl')[0].source)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "a.mp4")


def test_csv_and_json_list_manifests(tmp_path):
    (tmp_path / "m.csv").write_text("id,path,start,end,end_frame\nx,x.mp4,,,\ny,y.png,0.5,2,\nz,z.mkv,,,7\n")
    recs = read_manifest(tmp_path / "m.csv")
    assert [(r.id, r.kind, r.start, r.end, r.end_frame) for r in recs] == [
        ("x", "video", None, None, None), ("y", "image", 0.5, 2.0, None), ("z", "video", None, None, 7)]
    (tmp_path / "m.json").write_text(json.dumps([{"id": "p", "path": "p.mp4"}, {"id": "q", "image": "q.jpg"}]))
    assert [(r.id, r.kind) for r in discover(tmp_path / "m.json")] == [("p", "video"), ("q", "image")]


def test_manifest_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "path": "a.mp4"}\n{"id": "b" "path": 1}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:2: not valid JSON"):
        read_manifest(bad)
    nopath = tmp_path / "nopath.jsonl"
    nopath.write_text('{"id": "a"}\n')
    with pytest.raises(SourceError, match=r"nopath.jsonl:1: no 'path'"):
        read_manifest(nopath)
    kind = tmp_path / "kind.csv"
    kind.write_text("id,path,kind\na,a.mp4,audio\n")
    with pytest.raises(SourceError, match=r"kind.csv:2: .*kind must be one of video, image"):
        read_manifest(kind)
    with pytest.raises(SourceError, match="does not exist"):
        discover(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(SourceError, match="unknown type"):
        discover(tmp_path / "x.txt")


def test_directory_scan_ids_kinds_and_order(tmp_path):
    for name in ["b/2.mp4", "a.png", "b/1.MKV", "notes.txt", "c/d/e.jpeg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    recs = discover(tmp_path)
    assert [(r.id, r.kind) for r in recs] == [("a", "image"), ("b/1", "video"), ("b/2", "video"), ("c/d/e", "image")]
    assert all(Path(r.source).is_absolute() and Path(r.source).exists() for r in recs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="holds no videos"):
        scan_directory(empty)


def test_webdataset_tar_members_metadata_and_direct_reads(tmp_path):
    video, image = b"\x00\x00\x00\x18ftypmp42" + bytes(range(200)), b"\x89PNG" + bytes(50)
    tar = _tar(tmp_path / "shard-0.tar", [
        ("clips/000.mp4", video), ("clips/000.json", json.dumps({"id": "vid-a", "start": 1, "end": 2}).encode()),
        ("clips/001.png", image), ("clips/001.cls", b"3"),
        ("clips/002.txt", b"no media here"),
        ("clips/003.seg.mp4", video[:50]),
    ])
    recs = scan_tar(tar)
    assert [(r.id, r.kind) for r in recs] == [("vid-a", "video"), ("clips/001", "image"), ("clips/003", "video")]
    assert (recs[0].start, recs[0].end) == (1.0, 2.0)
    for rec, data, suffix in [(recs[0], video, ".mp4"), (recs[1], image, ".png"), (recs[2], video[:50], ".mp4")]:
        with local_file(rec.source) as path:
            assert Path(path).suffix == suffix and Path(path).read_bytes() == data
        assert not Path(path).exists()  # the temporary copy is gone
    _tar(tmp_path / "shard-1.tar", [("k.jpg", image)])
    both = discover(str(tmp_path / "shard-*.tar"))
    assert [r.id for r in both] == ["vid-a", "clips/001", "clips/003", "k"]
    listed = discover(f"{tmp_path / 'shard-1.tar'},{tmp_path / 'shard-0.tar'}")
    assert [r.id for r in listed] == ["k", "vid-a", "clips/001", "clips/003"]


def test_tar_errors(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(SourceError, match="not a readable tar"):
        scan_tar(tmp_path / "junk.tar")
    _tar(tmp_path / "badjson.tar", [("a.mp4", b"x"), ("a.json", b"{oops")])
    with pytest.raises(SourceError, match="a.json.*not valid JSON"):
        scan_tar(tmp_path / "badjson.tar")
    with pytest.raises(SourceError, match="matches no files"):
        discover(str(tmp_path / "none-*.tar"))


def test_decode_side_imports_stay_light():
    """Decode tasks import sources, video and the worker module: none may pull in torch or zarr
    (seconds per fresh Ray worker process)."""
    code = ("import sys, merv.extract.sources, merv.extract.video, merv.extract.worker;"
            "print(sorted(m for m in ('torch', 'zarr', 'webdataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unusable_manifests_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SourceError, match=r"empty.jsonl lists no samples"):
        read_manifest(tmp_path / "empty.jsonl")
    (tmp_path / "header.csv").write_text("id,path\n")
    with pytest.raises(SourceError, match=r"header.csv lists no samples"):
        read_manifest(tmp_path / "header.csv")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"id": "caf\xe9", "path": "a.mp4"}\n')
    with pytest.raises(SourceError, match=r"latin1.jsonl is not UTF-8 text"):
        read_manifest(tmp_path / "latin1.jsonl")
    (tmp_path / "strings.json").write_text('["a.mp4"]')
    with pytest.raises(SourceError, match=r"strings.json\[0\]: expected a JSON object"):
        read_manifest(tmp_path / "strings.json")
    with pytest.raises(SourceError, match=r"s3://bucket/manifest.jsonl: cannot be read .*AWS_ENDPOINT_URL"):
        discover("s3://bucket/manifest.jsonl")


def test_remote_sources_are_fetched_or_named(tmp_path):
    import fsspec

    with fsspec.open("memory://merv-test/clip.mp4", "wb") as fh:
        fh.write(b"bytes of a clip")
    with local_file("memory://merv-test/clip.mp4") as path:
        assert Path(path).suffix == ".mp4" and Path(path).read_bytes() == b"bytes of a clip"
    with pytest.raises(SourceError, match=r"memory://merv-test/none.mp4: no such object"):
        with local_file("memory://merv-test/none.mp4"):
            pass
    with pytest.raises(SourceError, match=r"gs://bucket/a.mp4: .*gcsfs"):  # gcsfs is not installed here
        with local_file("gs://bucket/a.mp4"):
            pass


def test_unreachable_endpoint_is_named():
    """A fresh process: s3fs caches filesystems, so the endpoint must come from this environment alone."""
    pytest.importorskip("s3fs")
    code = ("from merv.extract.sources import SourceError, local_file\n"
            "try:\n    local_file('s3://bucket/a.mp4').__enter__()\nexcept SourceError as e:\n    print(e)\n")
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
           "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard", "PATH": os.environ.get("PATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.startswith("s3://bucket/a.mp4: cannot be read") and "AWS_ENDPOINT_URL" in out.stdout, out
