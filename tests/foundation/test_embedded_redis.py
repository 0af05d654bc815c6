import os
import tempfile
from pathlib import Path

import pytest
import redis

from orchestrator_site import embedded_redis


@pytest.fixture
def socket_path():
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="baton-redis-") as directory:
        yield Path(directory) / "redis.sock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_embedded_redis_answers_ping_and_is_gone_after_stop(socket_path):
    process = embedded_redis.start(socket_path)
    try:
        client = redis.Redis(unix_socket_path=str(socket_path), socket_connect_timeout=1)
        assert client.ping() is True
        client.set("baton:probe", "1")
        assert client.get("baton:probe") == b"1"
    finally:
        embedded_redis.stop(process)

    assert process.returncode is not None
    assert not _pid_alive(process.pid)
    with pytest.raises(redis.ConnectionError):
        redis.Redis(unix_socket_path=str(socket_path), socket_connect_timeout=1).ping()


def test_embedded_redis_keeps_no_data_on_disk_after_stop(socket_path):
    process = embedded_redis.start(socket_path)
    redis.Redis(unix_socket_path=str(socket_path)).set("baton:probe", "1")
    embedded_redis.stop(process)

    left = sorted(path.name for path in socket_path.parent.iterdir())
    # Only a log may stay: no socket, no RDB snapshot, no append-only file.
    assert [name for name in left if not name.endswith(".log")] == []
