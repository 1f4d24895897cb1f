"""bench/serve_load.py's server (bench/serve_isolation.py's too): started only on a port nothing else listens on."""

import socket
import sys

import pytest

from tests.bench.support import BENCH

sys.path.insert(0, str(BENCH))  # its siblings (options.py), as when run
from bench.serve_load import start_server  # noqa: E402


def test_a_port_another_server_listens_on_is_refused_naming_it_before_starting_ours(tmp_path):
    """The other listener's /health answered while our server loaded (and then failed to bind): the bench timed it."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(SystemExit) as refused:
            start_server(tmp_path, tmp_path / "bench.db", port, max_batch_size=1, threads=None)
    assert str(refused.value) == f"--port {port}: Address already in use (another server?): give a free --port"
