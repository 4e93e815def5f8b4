"""ServerProcess: waits for /health, stops the server and sweeps what is left of its session."""
import os
import sys
import textwrap
import time

import pytest

from lenserve.server.process import ServerProcess, free_port, session_pids

SERVER = textwrap.dedent('''
    import http.server, os, signal, subprocess, sys, time
    port, mode = int(sys.argv[1]), sys.argv[2]
    # a helper in a process group of its own that outlives its parent, as Ray's raylet does
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=False,
                              preexec_fn=os.setpgrp)
    print("helper", helper.pid, flush=True)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, lambda *a: print("ignoring SIGTERM", flush=True))
    if mode == "crash":
        sys.exit("no model here")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def _start(tmp_path, mode, **kw):
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    return ServerProcess([sys.executable, str(script), str(port), mode], tmp_path / "log.txt", f"http://127.0.0.1:{port}",
                         sweep_grace_s=1.0, **kw)


def _helper_pid(proc: ServerProcess) -> int:
    for _ in range(100):
        for line in proc.log().splitlines():
            if line.startswith("helper "):
                return int(line.split()[1])
        time.sleep(0.05)
    raise AssertionError(proc.log())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_stop_terminates_the_server_and_sweeps_its_session(tmp_path):
    with _start(tmp_path, "normal") as proc:
        proc.wait_healthy(30)
        helper = _helper_pid(proc)
        assert _alive(helper) and helper in session_pids(proc.proc.pid)
    assert proc.exit_code == -15  # SIGTERM
    assert not _alive(helper) and session_pids(proc.proc.pid) == []
    assert proc.stop() == -15  # again: nothing more happens


def test_a_server_ignoring_sigterm_is_killed_after_the_timeout(tmp_path):
    with _start(tmp_path, "stubborn", stop_timeout_s=1.0) as proc:
        proc.wait_healthy(30)
        helper = _helper_pid(proc)
        t0 = time.monotonic()
    assert proc.exit_code == -9 and 1.0 <= time.monotonic() - t0 < 15
    assert "ignoring SIGTERM" in proc.log() and not _alive(helper)


def test_exit_before_healthy_raises_with_the_log(tmp_path):
    with _start(tmp_path, "crash") as proc:
        with pytest.raises(RuntimeError, match="exited with code 1 before it was healthy(?s:.*)no model here"):
            proc.wait_healthy(30)
        helper = _helper_pid(proc)
    assert not _alive(helper)  # its orphan is swept all the same
    assert os.path.exists(proc.log_path)
