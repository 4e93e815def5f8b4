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


RUNNER_TEST = textwrap.dedent('''
    import json, os, sys, time
    from lenserve.server.process import ServerProcess, free_port

    def test_hold_a_server(tmp_path):
        port = free_port()
        argv = json.loads(os.environ["HOLD_ARGV"].replace("PORT", str(port)))
        with ServerProcess(argv, os.environ["HOLD_LOG"], f"http://127.0.0.1:{port}", sweep_grace_s=float(os.environ["HOLD_GRACE"])) as proc:
            proc.wait_healthy(240)
            with open(os.environ["HOLD_PIDS"], "w") as f:
                json.dump({"server": proc.proc.pid, "watchdog": proc.watchdog.pid}, f)
            time.sleep(600)
''')


def _run_pytest_then_kill(tmp_path, argv: list[str], sig: int, grace_s: float = 5.0) -> tuple[dict, list[int]]:
    """Runs a pytest runner whose test holds a server, kills the runner with `sig` once the server
    is healthy; returns the pids it recorded and what is left of the server's session afterwards."""
    import json
    import subprocess

    (tmp_path / "test_hold.py").write_text(RUNNER_TEST)
    pids_file = tmp_path / "pids.json"
    env = {**os.environ, "HOLD_ARGV": json.dumps(argv), "HOLD_LOG": str(tmp_path / "server.log"), "HOLD_PIDS": str(pids_file),
           "HOLD_GRACE": str(grace_s)}
    runner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                               str(tmp_path / "test_hold.py")], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not pids_file.exists():
            assert runner.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text(errors="replace")[-2000:]
            time.sleep(0.2)
        time.sleep(0.2)
        pids = json.loads(pids_file.read_text())
        assert session_pids(pids["server"])
        runner.send_signal(sig)
        runner.wait(30)
        deadline = time.monotonic() + grace_s + 90
        while session_pids(pids["server"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = session_pids(pids["server"])
        if left:  # say what was left and whether the watchdog still runs
            left = [(pid, open(f"/proc/{pid}/cmdline", "rb").read()[:120]) for pid in left] + [("watchdog alive", _alive(pids["watchdog"]))]
        return pids, left
    finally:
        if runner.poll() is None:
            runner.kill()


@pytest.mark.parametrize("sig", [9, 15], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_runner_leaves_nothing_of_its_server(tmp_path, sig):
    """A pytest runner killed mid-test (SIGKILL: no fixture teardown at all): the server it started
    and the helper that server put in a process group of its own are gone within the grace."""
    port_script = tmp_path / "server.py"
    port_script.write_text(SERVER)
    pids, left = _run_pytest_then_kill(tmp_path, [sys.executable, str(port_script), "PORT", "normal"], sig)
    assert left == [], left
    deadline = time.monotonic() + 10
    while _alive(pids["watchdog"]) and time.monotonic() < deadline:  # its last sweep
        time.sleep(0.1)
    assert not _alive(pids["server"]) and not _alive(pids["watchdog"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sigkilled_runner_leaves_no_lenserve_server(tmp_path):
    """The same with a real `lenserve serve` (its engine thread, its HTTP server)."""
    argv = [sys.executable, "-m", "lenserve.cli", "serve", "--port", "PORT", "--predictor", "none", "--max-model-len", "512",
            "--kv-cache-memory-gb", "0.05"]
    pids, left = _run_pytest_then_kill(tmp_path, argv, 9, grace_s=10.0)
    assert left == [], left
    assert not _alive(pids["server"])
