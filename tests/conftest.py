"""Test-suite setup. pytest runs with --import-mode=importlib, which does not put the tests folder
on sys.path; the shared helper modules (helpers_media, helpers_llm, helpers_train) live here, so
add it once instead of loading them by path in every file."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for every in-process extraction test (ray.init costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1 (started on first use, one per session).

    Yields {"endpoint_url", "storage_options", "new_bucket"}: `storage_options` reach it through
    s3fs (key/secret "testing"); `new_bucket()` makes an empty bucket and returns its name."""
    import logging
    import socket
    import uuid

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one request log line per S3 call otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}

    def new_bucket() -> str:
        import s3fs

        name = f"merv-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**options).mkdir(name)
        return name

    yield {"endpoint_url": endpoint, "storage_options": options, "new_bucket": new_bucket}
    server.stop()
