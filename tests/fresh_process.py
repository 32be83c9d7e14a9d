"""Run a Python snippet in a fresh interpreter, as a user's process would
start: the repo on the path and XLA_FLAGS as the caller gives them (the test
session's single-thread flags are dropped unless passed). For failures that
kill or hang a process (segfaults, deadlocks), which no in-process assert
can report."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout: float, xla_flags: str | None = None):
  """CompletedProcess of `python -c code`; a hang past `timeout` s comes
  back as returncode None with a note in stdout rather than raising."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  try:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    return subprocess.CompletedProcess(e.cmd, None, out + f"\n[hung > {timeout} s]", "")


def start_on_cpu_devices(code: str, devices: int, env: dict) -> subprocess.Popen:
  """Start `python -c code` on `devices` simulated CPU devices (XLA's host
  platform split that many ways) with `env`, so the caller can work
  meanwhile; `result` reads what it printed."""
  env = {**env, "PYTHONPATH": ROOT, "XLA_FLAGS":
         f"--xla_force_host_platform_device_count={devices} " + env.get("XLA_FLAGS", "")}
  return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result(proc: subprocess.Popen, timeout: float):
  """The JSON the child printed after "RESULT " (its whole output in the
  assertion message if it printed none)."""
  output = proc.communicate(timeout=timeout)[0]
  lines = [l for l in output.splitlines() if l.startswith("RESULT ")]
  assert lines, output
  return json.loads(lines[0][len("RESULT "):])
