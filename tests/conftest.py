"""Shared fixtures: one Ray session and one S3-compatible server per test session.

The helper modules live in the `testkit` package next to this file (pytest's `pythonpath` setting
puts tests/ on sys.path). Tests marked `integration` start Ray, several processes, servers or the
CLI in subprocesses; `make test-fast` runs everything else.
"""

from __future__ import annotations

import pytest

_INTEGRATION_FIXTURES = {"ray_session", "s3_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the shared Ray session or the S3 server is an integration test, marked or not."""
    for item in items:
        if _INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


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
