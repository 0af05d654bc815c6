"""One web process: `python -m orchestrator_site.web --host H --port P [daphne options]`.

Several of them share one port. Each binds a listening socket of its own on H:P with
SO_REUSEPORT and then becomes Daphne serving Baton on that socket (exec, same pid). With one
socket per process the kernel spreads new connections evenly over the processes, where
processes accepting from one shared socket get them unevenly. So the sockets of a run's open
pages, and the work of sending each event to all of them, are spread over the CPU cores; the
Redis pub/sub channel layer brings every group message to every process.

Daphne adopts the socket through Twisted's systemd endpoint (the socket activation protocol:
the socket on fd 3, LISTEN_PID and LISTEN_FDS in the environment), which takes the address
family; Daphne's own --fd option assumes IPv4.
"""

import argparse
import os
import socket
import sys

APPLICATION = "orchestrator_site.asgi:application"
# Connections the kernel queues for a process that is busy (or still starting): a page load
# opens several, and a hundred pages may reconnect at once after a restart.
BACKLOG = 1024
LISTEN_FD = 3  # where socket activation puts the first inherited socket


def web_command(host: str, port: int, extra=()) -> list[str]:
    """The command line of one web process on host:port; `extra` are Daphne options."""
    module = [sys.executable, "-m", "orchestrator_site.web"]
    return [*module, "--host", host, "--port", str(port), *extra]


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port that other web processes can listen on too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator_site.web",
        description="Serve Baton with Daphne on a port shared with other web processes; "
        "other options are Daphne's.",
        allow_abbrev=False,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    args, daphne_options = parser.parse_known_args(argv)
    host = args.host.strip("[]")
    try:
        sock = listening_socket(host, args.port)
    except OSError as exc:
        sys.exit(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    os.dup2(sock.fileno(), LISTEN_FD)
    os.set_inheritable(LISTEN_FD, True)  # dup2 onto itself keeps close-on-exec
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="web")
    domain = "INET6" if sock.family == socket.AF_INET6 else "INET"
    endpoint = f"systemd:domain={domain}:index=0"
    daphne = [sys.executable, "-m", "daphne", "-e", endpoint, *daphne_options, APPLICATION]
    os.execv(sys.executable, daphne)


if __name__ == "__main__":
    main()
