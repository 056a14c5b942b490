"""What every benchmark script shares: the machine line, server processes, RSS, timing, the
table and the last-line JSON.

Rules the scripts follow (issue 8): every figure is a ratio against a baseline measured in the
same run; each script prints a table and, as its very last stdout line, one JSON object.
Servers run in their own processes (their RSS and their GIL are theirs alone, as in production);
everything they log goes to a file under the run's folder, never to stdout.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
# the service benchmarks run the tests' engines and tiny SLMs (tests/fakes), by import path, in
# this process and in the servers they start
sys.path.insert(0, str(REPO / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])


# ---- the machine --------------------------------------------------------------------------
def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def machine(*, started_load: float | None = None) -> dict[str, Any]:
    """Where and when: cores, 1-minute load at start and now, the date (UTC), versions."""
    import grpc
    info = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu_cores": os.cpu_count(), "load_1m_end": load_avg(), "python": sys.version.split()[0],
            "grpcio": grpc.__version__}
    if started_load is not None:
        info["load_1m_start"] = started_load
    return info


def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, <= 3 minutes on 2 cores")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep servers' logs and data here (default: a temporary folder, deleted)")
    p.add_argument("--profile", type=Path, default=None,
                   help="record the server process with py-spy into this folder (py-spy must be installed)")
    return p


@contextmanager
def workdir(path: Path | None, prefix: str) -> Iterator[Path]:
    """The run's scratch folder: `path` (kept) or a temporary one (deleted)."""
    if path is not None:
        path = path.resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    import tempfile
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# ---- output -------------------------------------------------------------------------------
def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print()


def emit_json(result: dict[str, Any], out: Path | None = None) -> None:
    """The script's figures: one JSON object, the last line on stdout (and `out`, if given)."""
    line = json.dumps(result, sort_keys=False, default=_jsonable)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def ratio(a: float, b: float, digits: int = 3) -> float:
    return round(a / b, digits) if b else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


class Stopwatch:
    """`with Stopwatch() as sw: ...`; then `sw.s` holds the seconds."""

    def __enter__(self) -> "Stopwatch":
        self.s = float("nan")
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self._t0


# ---- memory -------------------------------------------------------------------------------
def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


class PeakRss:
    """Peak RSS growth of one process over a block: reset the kernel's high-water mark
    (`/proc/PID/clear_refs` = 5), read VmHWM afterwards. Where the reset is refused, a
    10 ms sampling thread stands in (it can miss a spike shorter than that)."""

    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getpid()
        self.growth_mib = float("nan")

    def __enter__(self) -> "PeakRss":
        self.start_mib = rss_mib(self.pid)
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self._sampler = None
        except OSError:
            self._peak, self._stop = self.start_mib, threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._peak = max(self._peak, rss_mib(self.pid))

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            peak = _status_kib(self.pid, "VmHWM") / 1024
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        self.peak_mib = peak
        self.growth_mib = round(max(0.0, peak - self.start_mib), 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class Measure:
    """Wall seconds, CPU seconds and peak RSS growth of some processes over a block:
    `with Measure(server_pid, os.getpid()) as m: ...`, then `m.s`, `m.cpu_s[pid]`, `m.rss_mib[pid]`.

    CPU seconds are the steadier figure on a shared machine: another job's load stretches the
    wall time of a transfer but hardly the CPU the transfer itself burns."""

    def __init__(self, *pids: int):
        self.pids = pids or (os.getpid(),)

    def __enter__(self) -> "Measure":
        self._rss = [PeakRss(pid).__enter__() for pid in self.pids]
        self._cpu0 = {pid: cpu_seconds(pid) for pid in self.pids}
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self._t0
        self.cpu_s = {pid: cpu_seconds(pid) - self._cpu0[pid] for pid in self.pids}
        for r in self._rss:
            r.__exit__(None, None, None)
        self.rss_mib = {r.pid: r.growth_mib for r in self._rss}


def runqueue_wait_s(pid: int) -> float:
    """Seconds the threads of a process have spent runnable but waiting for a CPU (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            pass  # a thread that just ended
    return total / 1e9


# ---- bundles ------------------------------------------------------------------------------
def write_big_safetensors(path: Path, mib: int) -> None:
    """A valid safetensors file of about `mib` MiB of random F32, written block by block."""
    n = mib * MiB // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    block = os.urandom(MiB)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for _ in range(mib):
            f.write(block)


def big_bundle(root: Path, mib: int, *, silo: str = "bench", task: str = "bench"):
    """A tiny SLM folder whose model.safetensors is `mib` MiB, and its manifest."""
    from fakes.tiny_slm import new_tiny_slm
    from crosslm_shared.bundle import make_manifest
    folder = new_tiny_slm(["neg", "pos"], tokenizer_dir=root / "tok").save(root / f"slm-{silo}-{mib}")
    write_big_safetensors(folder / "model.safetensors", mib)
    return folder, make_manifest(folder, task=task, silo=silo, arch="tiny", labels=["neg", "pos"])


def bundle_for(folder: Path, manifest, silo: str, dest: Path):
    """The same bundle for another silo: hard links to the same files, the manifest renamed."""
    from dataclasses import replace
    dest.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        target = dest / f.name
        if not target.exists():
            try:
                os.link(f, target)
            except OSError:
                shutil.copyfile(f, target)
    return dest, replace(manifest, silo=silo)


def drop_dirty_pages() -> None:
    """Flush written-back data before a timed transfer, so one measurement does not pay for the last."""
    os.sync()


# ---- server processes -----------------------------------------------------------------------
def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def server_keys(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (VALUE as TOML) as extra `[server]` keys for `start_server`."""
    import tomllib
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    return out


@dataclass
class ServerProcess:
    """A `crosslm-server serve` subprocess on free ports; `client(silo)` talks to it."""
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    root: Path
    tls: bool
    certs: Any = None
    log_path: Path | None = None
    profiler: subprocess.Popen | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"  # the server certificate names 127.0.0.1 too

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, silo: str, **kw):
        from crosslm_client.transport import CrossLMClient, TlsFiles
        tls = None
        if self.tls:
            cert, key = self.certs.silos[silo]
            tls = TlsFiles(ca=self.certs.ca, cert=cert, key=key)
        return CrossLMClient(self.address, silo, tls=tls, **kw)

    def http(self, path: str, timeout: float = 5.0) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.http("/readyz", timeout=2) == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"server not ready within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text()[-n:] if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.profiler is not None:
            self.profiler.wait(120)
        if self._log is not None:
            self._log.close()


def start_server(root: Path, *, name: str = "server", engine: str = "fakes.echo_engine:EchoEngine", engine_options: dict | None = None,
                 tls: bool = False, silos: Sequence[str] = ("bench",), server: dict | None = None,
                 profile: Path | None = None, ready_timeout: float = 300.0) -> ServerProcess:
    """Write a server TOML under `root/name` and start `crosslm-server serve` on free ports.

    `tls`: mTLS with certificates made for `silos` (CN = silo); else plaintext dev mode.
    `server`: extra `[server]` keys. `profile`: run it under `py-spy record` (raw folded stacks).
    Returns once /readyz answers 200.
    """
    from crosslm_shared.certs import make_certs
    root = root / name
    root.mkdir(parents=True, exist_ok=True)
    keys: dict[str, Any] = {"grpc_host": "127.0.0.1", "grpc_port": 0, "http_host": "127.0.0.1", "http_port": 0,
                            "data_dir": str(root / "data"), "log_level": "INFO",
                            # the benchmarks upload many bundles without submitting them: they measure
                            # transfer, not the per-silo pending-upload quotas (docs/service.md, Quotas)
                            "max_pending_uploads_per_silo": 100_000, "max_silo_upload_bytes": 2**50}
    certs = None
    if tls:
        certs = make_certs(root / "certs", server_hosts=[], silos=list(silos), force=True)
        keys |= {"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key), "tls_ca": str(certs.ca)}
    else:
        keys["plaintext_dev_mode"] = True
    keys |= server or {}
    lines = ["[server]"] + [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    lines += ["[store]", 'kind = "sqlite"', "[engine]", f"name = {toml_value(engine)}", "[engine.options]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (engine_options or {}).items()]
    config = root / "server.toml"
    config.write_text("\n".join(lines) + "\n")
    log_path = root / "server.log"
    log = log_path.open("w")
    cmd = [sys.executable, "-m", "crosslm_server.service.cli", "serve", "--config", str(config)]
    profiler = None
    if profile is not None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy==0.4.3")
        profile.mkdir(parents=True, exist_ok=True)
        cmd = [spy, "record", "--format", "raw", "--threads", "--rate", "200", "--nonblocking",
               "-o", str(profile / f"{name}.folded"), "--"] + cmd
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    if profile is not None:
        profiler, proc = proc, _python_child(proc)
    grpc_port = http_port = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"on [^ ]+:(\d+) and HTTP on [^ ]+:(\d+)", log_path.read_text())
        if match:
            grpc_port, http_port = int(match.group(1)), int(match.group(2))
            break
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    else:
        proc.kill()
        raise SystemExit(f"server did not bind within 120 s: {log_path.read_text()[-3000:]}")
    sp = ServerProcess(proc, grpc_port, http_port, root, tls, certs, log_path, profiler, log)
    sp.wait_ready(ready_timeout)
    return sp


class _Child:
    """The Python process py-spy started, seen through the Popen surface `ServerProcess` uses."""

    def __init__(self, pid: int):
        import psutil
        self.pid, self._p, self.returncode = pid, psutil.Process(pid), None

    def poll(self):
        if self._p.is_running() and self._p.status() != "zombie":
            return None
        self.returncode = 0
        return 0

    def terminate(self) -> None:
        self._p.terminate()

    def kill(self) -> None:
        self._p.kill()

    def wait(self, timeout=None):
        import psutil
        try:
            self._p.wait(timeout)
        except psutil.TimeoutExpired as e:
            raise subprocess.TimeoutExpired("server", timeout) from e
        self.returncode = 0
        return 0


def _python_child(spy: subprocess.Popen, timeout: float = 30.0) -> _Child:
    import psutil
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(spy.pid).children()
        if children:
            return _Child(children[0].pid)
        time.sleep(0.05)
    raise SystemExit("py-spy did not start the server")


def folded_top(path: Path, *, n: int = 15, thread: str | None = None) -> list[tuple[str, float]]:
    """The functions with the most samples (self + children) in a py-spy raw (folded) profile."""
    totals: dict[str, int] = {}
    grand = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if thread and thread not in stack.split(";", 1)[0]:
            continue
        c = int(count)
        grand += c
        for frame in set(stack.split(";")):
            totals[frame] = totals.get(frame, 0) + c
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
    return [(frame, round(100 * c / grand, 1)) for frame, c in top] if grand else []


def setup_torch(threads: int = 0) -> None:
    """Torch compute threads (0 = torch's choice) and quiet transformers logs, for the model benchmarks."""
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
