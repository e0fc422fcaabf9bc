"""HAProxy with the recipe's own config (``server/haproxy/haproxy.cfg``) in front of running replicas.

The config takes its addresses from the environment (``SCALELLM_LB_BIND``, ``SCALELLM_LB_STATS_BIND``,
``SCALELLM_REPLICA1``, ...) and declares two replicas; for another count, ``render_config`` writes one
``server`` line per replica in the same form, as server/replicas.md tells users to. Used by the failover
test (tests/server/test_load_balancer.py) and the scale-out benchmark (benchmarks/scale_out.py).
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "server" / "haproxy" / "haproxy.cfg"
_SERVER_LINE = re.compile(r'^(\s+)server replica(\d+) "\$\{SCALELLM_REPLICA\2-[^}]*\}"$')


def haproxy_binary() -> str | None:
    """The ``haproxy`` executable, or None when it is not installed (``apt-get install haproxy``)."""
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                            if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(replicas: int, template: str | None = None) -> str:
    """The recipe's config with ``replicas`` server lines (replica1..replicaN), every other line unchanged."""
    lines = (CONFIG.read_text() if template is None else template).splitlines(keepends=True)
    found = [(i, m) for i, line in enumerate(lines) if (m := _SERVER_LINE.match(line.rstrip("\n")))]
    if not found or [int(m.group(2)) for _, m in found] != list(range(1, len(found) + 1)) or \
            [i for i, _ in found] != list(range(found[0][0], found[0][0] + len(found))):
        raise ValueError(f"{CONFIG}: expected consecutive lines `server replicaK \"${{SCALELLM_REPLICAK-...}}\"`")
    indent, first = found[0][1].group(1), found[0][0]
    new = [f'{indent}server replica{k} "${{SCALELLM_REPLICA{k}-127.0.0.1:{8000 + k}}}"\n'
           for k in range(1, replicas + 1)]
    return "".join(lines[:first] + new + lines[first + len(found):])


def _connection_limit() -> list[str]:
    """``-n N`` where this process may not open the file descriptors the config's maxconn needs (two per
    connection; HAProxy refuses to start if it cannot raise its limit that far), else nothing."""
    wanted = int(re.search(r"^\s*maxconn (\d+)", CONFIG.read_text(), re.M).group(1))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 2 * wanted + 100:
        return []
    return ["-n", str(max(64, (hard - 100) // 2))]


class HAProxy:
    """``haproxy -f <the recipe's config>`` for ``replicas`` (host:port each) on free local ports; its log
    is kept in ``log``. ``url`` is the OpenAI endpoint's base, ``stats_url`` HAProxy's stats frontend."""

    def __init__(self, replicas: list[str]):
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        self._folder = tempfile.TemporaryDirectory(prefix="scalellm-haproxy-")
        config = pathlib.Path(self._folder.name) / "haproxy.cfg"
        config.write_text(render_config(len(replicas)))
        port, stats_port = free_port(), free_port()
        env = {**os.environ, "SCALELLM_LB_BIND": f"127.0.0.1:{port}",
               "SCALELLM_LB_STATS_BIND": f"127.0.0.1:{stats_port}",
               **{f"SCALELLM_REPLICA{k}": address for k, address in enumerate(replicas, 1)}}
        self.url, self.stats_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}"
        self.process = subprocess.Popen([binary, "-f", str(config), *_connection_limit()], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self._reader = threading.Thread(target=lambda: self.log.extend(self.process.stdout), daemon=True)
        self._reader.start()

    def server_states(self) -> dict[str, str]:
        """``{"replica1": "UP", "replica2": "DOWN", ...}`` from HAProxy's stats (``/stats;csv``)."""
        with urllib.request.urlopen(self.stats_url + "/stats;csv", timeout=5) as response:
            text = response.read().decode().lstrip("# ")
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "replicas" and row["svname"].startswith("replica")}

    def wait_all_up(self, timeout: float = 30.0) -> None:
        """Until HAProxy's health checks see every replica UP; raises with HAProxy's log after ``timeout``."""
        deadline, states = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                states = self.server_states()
                if states and all(state == "UP" for state in states.values()):
                    return
            except OSError:
                pass  # the stats frontend is not listening yet
            time.sleep(0.1)  # polling another process's health checks: nothing to wait on here
        self.stop()
        raise RuntimeError(f"haproxy: replicas not all UP ({states}); its log:\n" + "".join(self.log))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        self._folder.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
