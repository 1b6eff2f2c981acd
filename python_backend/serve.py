"""Start a real Triton Inference Server on a model repository.

Inside the NVIDIA container `tritonserver` is on PATH and is used as it is. Elsewhere the binary that
the `nvidia-pytriton` wheel ships is used: we assemble a backend folder in a cache of ours (the Python
backend plus the stub built for the running Python), put the wheel's libraries on LD_LIBRARY_PATH, and
put this interpreter's bin folder first on PATH. The stub's embedded interpreter ignores PYTHONPATH but
locates its prefix from the `python3` it finds on PATH, so that is how a model sees this environment
(virtual environment included): torch, transformers and our own packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from python_backend.pool.transport import URL_ENV

CACHE_DIR = Path(os.environ.get("FASTSERVE_CACHE", Path.home() / ".cache" / "fastserve"))


# What a CPU-only host always logs; not a reason for anything to fail.
_NO_GPU_NOISE = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "Unable to get GPU")


class ServerError(RuntimeError):
    """The server could not start, or stopped; the message carries the server's own error lines."""


@dataclass
class TritonInstall:
    """Where a runnable tritonserver and its backends live, and the environment it needs."""

    binary: Path
    backend_dir: Path | None
    env: dict[str, str]


def _pytriton_root() -> Path | None:
    try:
        import pytriton  # noqa: F401  (the wheel's package; we use only its files)
    except ImportError:
        return None
    return Path(sys.modules["pytriton"].__file__).parent / "tritonserver"


def _stub_backend_dir(ts_root: Path) -> Path:
    """A backend folder with the Python backend and the stub for this Python (built once, cached)."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = ts_root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton ships no Python backend stub for Python {ver} ({stub} is missing)")
    target = CACHE_DIR / "triton-backends" / f"py{ver}"
    python_dir = target / "python"
    marker = python_dir / ".source"
    source = str(ts_root.resolve())
    if marker.is_file() and marker.read_text() == source:
        return target
    tmp = Path(tempfile.mkdtemp(prefix="backends-", dir=CACHE_DIR.as_posix() if CACHE_DIR.exists() else None))
    try:
        shutil.copytree(ts_root / "backends" / "python", tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        (tmp / "python" / "triton_python_backend_stub").chmod(0o755)
        (tmp / "python" / ".source").write_text(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(tmp), str(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _python_env(base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    # $FASTSERVE_STUB_BIN: another interpreter's bin folder for the stub (one with numpy < 2 where the
    # host's own has numpy 2, which the stub of nvidia-pytriton 0.7 cannot exchange tensors with)
    stub_bin = os.environ.get("FASTSERVE_STUB_BIN")
    env["PATH"] = (stub_bin or str(Path(sys.executable).parent)) + os.pathsep + env.get("PATH", "")
    project_root = str(Path(__file__).resolve().parent.parent)
    # that other interpreter brings its own packages: ours (numpy 2 among them) would shadow them
    paths = [project_root] + ([] if stub_bin else [p for p in sys.path if p and "site-packages" in p])
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def find_triton(binary: str | os.PathLike | None = None) -> TritonInstall:
    """Pick the server: an explicit path (or $FASTSERVE_TRITONSERVER, e.g. the launcher of a packed
    server), then `tritonserver` on PATH, then the nvidia-pytriton wheel."""
    env = _python_env(dict(os.environ))
    binary = binary or os.environ.get("FASTSERVE_TRITONSERVER") or None
    if binary:
        path = Path(binary)
        if not path.is_file():
            raise ServerError(f"--tritonserver {path}: no such file")
        return TritonInstall(path, None, env)
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, env)
    ts_root = _pytriton_root()
    if ts_root is None:
        raise ServerError(
            "no tritonserver found: not on PATH, and the nvidia-pytriton package is not installed "
            "(pip install nvidia-pytriton, or run inside the NVIDIA Triton container)"
        )
    libs = ts_root.parent.parent / "nvidia_pytriton.libs"
    pylib = sysconfig.get_config_var("LIBDIR") or ""
    ld = [str(libs), pylib, env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
    return TritonInstall(ts_root / "bin" / "tritonserver", _stub_backend_dir(ts_root), env)


ADMIN_APIS = "model-repository,logging,trace"  # Triton's API groups that change or reveal the server's setup
# Triton's restricted endpoints want this header over HTTP; over gRPC it prefixes the name with
# "triton-grpc-protocol-".
ADMIN_HEADER = "authorization"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """One tritonserver process on a repository; a context manager that waits until it is ready."""

    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    binary: str | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    host: str | None = None  # the address the endpoints listen on (None: Triton's default, every address)
    admin_key: str | None = None  # where set, the administrative endpoints want `Authorization: Bearer KEY`
    proc: subprocess.Popen | None = None
    _lines: deque = field(default_factory=lambda: deque(maxlen=2000))
    _reader: threading.Thread | None = None
    echo: bool = False

    @property
    def _local(self) -> str:
        """Where this machine reaches the server."""
        return "localhost" if self.host in (None, "", "0.0.0.0", "::") else self.host

    @property
    def http_url(self) -> str:
        return f"{self._local}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._local}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._local}:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=explicit",
            "--load-model=*",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--log-verbose={self.log_verbose}",
        ]
        if install.backend_dir is not None:
            cmd.append(f"--backend-directory={install.backend_dir}")
        if self.host:
            cmd += [f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}"]
        if self.admin_key:
            # loading, unloading and the repository index; log and trace settings
            restricted = f"{ADMIN_APIS}:{ADMIN_HEADER}=Bearer {self.admin_key}"
            cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 300.0) -> TritonServer:
        if not Path(self.repository).is_dir():
            raise ServerError(f"model repository {self.repository} is not a folder")
        install = find_triton(self.binary)
        env = {**install.env, URL_ENV: self.grpc_url, **self.env}  # where pools reach their members
        self.proc = subprocess.Popen(
            self.command(install),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._pump, daemon=True, name="tritonserver-log")
        self._reader.start()
        self.wait_ready(timeout)
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line.rstrip("\n"))
            if self.echo:
                print(line, end="", flush=True)

    def log(self) -> str:
        return "\n".join(self._lines)

    def error_lines(self) -> str:
        """The server's own error lines (E...), or the tail of its log where it printed none."""
        lines = [ln for ln in self._lines if not any(n in ln for n in _NO_GPU_NOISE)]
        errors = [ln for ln in lines if ln.startswith("E") or "UNAVAILABLE" in ln]
        return "\n".join(errors or lines[-30:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                if self._reader:
                    self._reader.join(timeout=5)
                raise ServerError(
                    f"tritonserver exited with code {self.proc.returncode} before it was ready:\n{self.error_lines()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f}s:\n{self.error_lines()}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # the server's group: Python-backend stubs it left behind go with it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        if self._reader:
            self._reader.join(timeout=5)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(server: TritonServer, timeout: float = 600.0, front=None, front_port: int = 0) -> int:
    """Run the server in the foreground until Ctrl-C, SIGTERM, or until it stops by itself; with
    `front` (the OpenAI API's settings) and a port, the OpenAI API too, for as long as Triton runs."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Installed explicitly: a process started in the background inherits SIGINT as ignored.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    server.echo = False
    try:
        server.start(timeout=timeout)
    except ServerError as e:
        print(f"fastserve serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        server.stop()
        return 0
    print(f"Triton is ready on {Path(server.repository).resolve()}", flush=True)
    print(f"  HTTP     http://{server.http_url}   (generate: POST /v2/models/<name>/generate)", flush=True)
    print(f"  gRPC     {server.grpc_url}", flush=True)
    print(f"  metrics  {server.metrics_url}", flush=True)
    if server.admin_key:
        print(f"  model control wants '{ADMIN_HEADER}: Bearer <key>' (gRPC: '{GRPC_ADMIN_HEADER}')", flush=True)
    server.echo = True
    if front is not None and front_port:
        from frontend.server import run

        host = server.host or "0.0.0.0"
        print(f"  OpenAI   http://{server._local}:{front_port}/v1", flush=True)
        print("Ctrl-C stops both.", flush=True)
        try:
            code = run(front, host, front_port, alive=lambda: server.proc is not None and server.proc.poll() is None)
        except KeyboardInterrupt:
            code = 0
        if server.proc is not None and server.proc.poll() is not None:
            print(
                f"fastserve serve: tritonserver stopped with code {server.proc.returncode}:\n{server.error_lines()}",
                file=sys.stderr,
            )
            return server.proc.returncode or 1
        print("\nstopping tritonserver...", flush=True)
        server.stop()
        return code
    print("Ctrl-C stops the server.", flush=True)
    try:
        assert server.proc is not None
        code = server.proc.wait()
        print(f"fastserve serve: tritonserver stopped with code {code}:\n{server.error_lines()}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        print("\nstopping tritonserver...", flush=True)
        server.stop()
        return 0


class ServeProcess:
    """`fastserve serve` in a process of its own, as a user runs it, on free ports: Triton and the
    OpenAI API. For tests and benchmarks that must see the command, not a part of it."""

    def __init__(
        self, repository: Path, log: Path, args: tuple[str, ...] | list[str] = (), env: dict[str, str] | None = None
    ):
        self.ports = {name: free_port() for name in ("http", "grpc", "metrics", "openai")}
        cmd = [sys.executable, "-m", "fastserve.cli", "serve", "--repository", str(repository), "--host", "127.0.0.1"]
        cmd += [f"--{name}-port={port}" for name, port in self.ports.items()] + list(args)
        self.log_path = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        host = "127.0.0.1"
        self.openai_url = f"http://{host}:{self.ports['openai']}"
        self.grpc_url = f"{host}:{self.ports['grpc']}"
        self.http_url = f"http://{host}:{self.ports['http']}"
        self.metrics_url = f"http://{host}:{self.ports['metrics']}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600.0) -> ServeProcess:
        """Until the OpenAI API's /health answers 200 (Triton ready behind it); ServerError if the
        command exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"fastserve serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.openai_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"fastserve serve was not ready within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
