"""Running the real ``epserve serve`` (torchrun) as a child process, for the e2e tests and the serving benchmark:
start, wait until it answers, stop, and make sure every process of the group is gone.

    ServeProcess(argv) --Popen (own session; optionally inside a network namespace)--> launcher --> torchrun
        --> ranks; wait_ready() polls /health (bounded); stop() SIGINT --> bounded wait --> SIGKILL to every
        process of the tree (collected while it lived)

Needs httpx and psutil (main dependencies); nothing the server itself runs imports this module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]   # the checkout the child imports (PYTHONPATH)
READY_TIMEOUT_S = 240.0


def serve_env(extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    env.pop("EPSERVE_API_KEY", None)
    env.update(extra or {})
    return env


class ServeProcess:
    def __init__(self, argv: list[str], *, port: int, log_path: Path, netns: str | None = None,
                 env: dict | None = None, host: str = "127.0.0.1") -> None:
        cmd = [sys.executable, "-m", "launch.cli", "serve", "--port", str(port), "--host", host, *argv]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.port, self.host, self.netns, self.log_path = port, host, netns, log_path
        self.url = f"http://{host}:{port}"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=serve_env(env), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._seen: dict[int, psutil.Process] = {}

    # ---- processes ------------------------------------------------------------------------------------------
    def tree(self) -> list[psutil.Process]:
        """The launcher and every descendant alive now (remembered, so stop() can kill them later)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            self._seen.setdefault(p.pid, p)
        return procs

    def rank_processes(self) -> dict[int, psutil.Process]:
        """RANK -> worker process (the ``launch.serve`` processes of the tree)."""
        out = {}
        for p in self.tree():
            try:
                if "launch.serve" in p.cmdline():
                    out[int(p.environ()["RANK"])] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
                continue
        return out

    def alive(self) -> list[psutil.Process]:
        return [p for p in self._seen.values() if _running(p)]

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until GET /health answers 200 (checked from inside the namespace when there is one)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.tree()
            if self.proc.poll() is not None:
                raise RuntimeError(f"epserve serve exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.log()[-6000:]}")
            if self.health_status() == 200:
                self.tree()
                return
            time.sleep(0.5)
        raise RuntimeError(f"epserve serve not ready after {timeout_s:.0f} s:\n{self.log()[-6000:]}")

    def health_status(self) -> int | None:
        """HTTP status of /health, or None when nothing answers."""
        if self.netns:
            out = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c",
                                  f"import httpx; print(httpx.get('{self.url}/health', timeout=2).status_code)"],
                                 capture_output=True, text=True, timeout=30)
            return int(out.stdout) if out.returncode == 0 and out.stdout.strip().isdigit() else None
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code
        except httpx.HTTPError:
            return None

    def wait_exit(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def wait_all_gone(self, timeout_s: float) -> list[psutil.Process]:
        """Processes of the tree still alive after ``timeout_s`` (empty: all gone)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not self.alive():
                return []
            time.sleep(0.2)
        return self.alive()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT to the launcher (as Ctrl-C), then SIGKILL to whatever of the tree is left. Returns the
        launcher's exit status if it exited by itself within ``timeout_s``."""
        self.tree()
        code = None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            code = self.wait_exit(timeout_s)
        else:
            code = self.proc.returncode
        self.kill()
        return code

    def kill(self) -> None:
        self.tree()
        for p in self._seen.values():
            if _running(p):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        psutil.wait_procs(list(self._seen.values()), timeout=10)
        self._log.close()


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
