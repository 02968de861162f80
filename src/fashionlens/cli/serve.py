"""``fashionlens serve INDEX_DIR``: the web service and page (FastAPI + uvicorn)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer
import uvicorn

from fashionlens.cli.console import console
from fashionlens.errors import UserError
from fashionlens.serving.config import ServeConfig


def serve_command(
    index_dir: Annotated[str, typer.Argument(help="index folder made by 'fashionlens index', or a Milvus store "
                                             "(milvus://HOST:PORT/COLLECTION, milvus+lite://FILE.db/COLLECTION)")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file with settings (see below)")] = None,
    host: Annotated[Optional[str], typer.Option(help="address to listen on")] = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port (0: any free one)")] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    uploads: Annotated[Optional[str], typer.Option(help="where added photos go (a Milvus store: a folder or fsspec "
                                                   "URL every replica reads)")] = None,
):
    """Serve search by photo over HTTP: the page at /, the JSON API under /api, OpenAPI docs at
    /docs, /health and /metrics.

    Items can be added (POST /api/items) and deleted (DELETE /api/items/ID) only when the
    environment variable named by api_key_env (FASHIONLENS_API_KEY) holds a key at start-up;
    clients send it in the X-API-Key header. Without it the catalog is served read-only and
    other fashionlens commands may update the index meanwhile (restart to see their changes).

    A Milvus store keeps nothing on this machine: any number of replicas may serve it, each add or
    removal through one seen by the others' searches (setting consistency); added photos go to
    --uploads, which every replica must read.
    """
    from fashionlens.serving.app import create_app
    from fashionlens.serving.shared import open_live

    cfg = ServeConfig.load(config, host=host, port=port, device=device, uploads=uploads)
    api_key = os.environ.get(cfg.api_key_env) or None
    if api_key is not None and len(api_key) < 16:
        raise UserError(f"{cfg.api_key_env}: the API key must have at least 16 characters")
    sock = _bind(cfg.host, cfg.port)  # a taken port fails before the models load
    _log_to_stderr()
    live = open_live(index_dir, cfg, writable=api_key is not None)
    app = create_app(live, api_key)
    host_shown, port_bound = sock.getsockname()[:2]
    console.print(f"[green]serving[/green] {index_dir} ({live.count():,} items"
                  f"{', attributes' if live.attributes else ''}, "
                  f"{'read-write' if api_key else 'read-only'}) on http://{host_shown}:{port_bound}/", highlight=False, soft_wrap=True)
    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    server.run(sockets=[sock])
    console.print("stopped")


class _Server(uvicorn.Server):
    """uvicorn's server, ending with exit code 0 after a clean shutdown on SIGINT / SIGTERM
    (uvicorn re-raises the signal, which ends the process as killed by it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


serve_command.__doc__ += "\n\nSettings:\n\n" + ServeConfig.help_text()


def _log_to_stderr() -> None:
    """The server's own messages (catching up the index, rebuilds, errors) on stderr with their
    time; uvicorn's are configured by uvicorn (warnings and above)."""
    logger = logging.getLogger("fashionlens")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without
    # it a response's headers and body wait for the client's delayed ACK (40 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
