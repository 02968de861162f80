"""``fashionlens serve`` as a child process on a free localhost port: for scripts, the service
tests and the load benchmark. It waits for the server's "serving ... on URL" line, keeps reading
its log, and can stop it cleanly (SIGTERM) or kill it (SIGKILL)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


class Server:
    def __init__(self, index: Path, api_key: str | None = None, config: Path | None = None,
                 extra_env: dict | None = None, timeout: float = 180.0, threads: int | None = None,
                 cwd: Path | None = None):
        """``threads``: OMP_NUM_THREADS of the server (None: as this process has it, else torch's
        default of one per core)."""
        env = {**os.environ, **(extra_env or {})}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        env.pop("FASHIONLENS_API_KEY", None)
        if api_key:
            env["FASHIONLENS_API_KEY"] = api_key
        cmd = [sys.executable, "-m", "fashionlens", "serve", str(index), "--port", "0"]
        if config is not None:
            cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     cwd=cwd)
        self.log: list[str] = []
        self.url = None
        deadline = time.monotonic() + timeout
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"the server exited ({self.proc.wait()}):\n{''.join(self.log)}")
            self.log.append(line)
            match = re.search(r"on (http://[\d.]+:\d+)/", line)
            if match:
                self.url = match.group(1)
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not start:\n" + "".join(self.log))
        # keep draining stderr so that the server never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self, "client"):
            self.client.close()
        if self.proc.poll() is None:
            self.stop()
