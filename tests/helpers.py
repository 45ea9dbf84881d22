"""What every algorithm's smoke tests share: running the real script in a subprocess, reading its
TensorBoard events, stopping it with SIGTERM once it has checkpointed, and counting stored rows."""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np

ALGOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "algos")
sys.path.insert(0, ALGOS)


def script(name: str) -> str:
    return os.path.join(ALGOS, name)


def run_script(path: str, args: list, cwd, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, path, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def only_run_dir(cwd) -> str:
    (run_dir,) = glob.glob(str(cwd / "runs" / "*"))
    return run_dir


def start_and_terminate(path: str, args: list, cwd, settle: float = 1.0) -> tuple[int, str]:
    """Start the script, wait for its first checkpoint, SIGTERM it; returns (exit code, output)."""
    proc = subprocess.Popen([sys.executable, path, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt")):
        time.sleep(0.5)
    time.sleep(settle)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def stored_rows(run_dir: str) -> tuple[int, int]:
    """(rows in every stored episode file, the unfinished one included; number of finished episodes)."""
    files = glob.glob(os.path.join(run_dir, "episodes", "*.npz"))
    rows = sum(len(np.load(f)["obs"]) for f in files)
    return rows, len([f for f in files if "partial" not in f])
