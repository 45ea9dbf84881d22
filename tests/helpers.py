"""What every algorithm's smoke tests share: running the real script in a subprocess, reading its
TensorBoard events, stopping it with SIGTERM once it has checkpointed, and counting stored rows."""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ALGOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "algos")
sys.path.insert(0, ALGOS)


def script(name: str) -> str:
    return os.path.join(ALGOS, name)


# One OpenMP thread per script: the tiny smoke configurations are made of small ops, which two threads on a
# shared 2-core machine make many times slower whenever anything else runs (../shared/PERFORMANCE_TARGETS.md).
SCRIPT_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_script(path: str, args: list, cwd, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, path, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=SCRIPT_ENV)


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
    proc = subprocess.Popen([sys.executable, path, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=SCRIPT_ENV)
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


def checkpoint(run_dir: str) -> dict:
    import torch
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)


def check_resume_doubles_the_run(path: str, args: list, total: int, cwd, run_dir: str) -> dict:
    """Resume `run_dir` with `args` and --total-timesteps 2·total: the run must continue in the same
    directory from the saved step to the new total with more updates. Returns the new checkpoint."""
    before = checkpoint(run_dir)
    out = run_script(path, [*args, "--total-timesteps", str(2 * total), "--resume", run_dir], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed {run_dir} at step {total}" in out.stdout
    after = checkpoint(run_dir)
    assert after["global_step"] == 2 * total and after["updates"] > before["updates"]
    assert only_run_dir(cwd) == run_dir
    return after


def kill_and_resume(path: str, args: list, cwd) -> tuple[str, dict, int]:
    """SIGTERM a long run after its first checkpoint: it must exit 130 having stored every step of every
    episode (the unfinished one included), and a resume must reload all of them. Returns (run dir, the
    checkpoint written at the kill, the number of episodes finished by then)."""
    code, out = start_and_terminate(path, [*args, "--total-timesteps", "1000000"], cwd)
    assert code == 130, out
    run_dir = only_run_dir(cwd)
    ckpt = checkpoint(run_dir)
    rows, episodes = stored_rows(run_dir)
    assert rows == ckpt["global_step"] + episodes + 1
    out = run_script(path, [*args, "--total-timesteps", str(ckpt["global_step"] + 20), "--resume", run_dir], cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{rows} replay rows reloaded" in out.stdout
    return run_dir, ckpt, episodes


def stop_in_process(module, argv: list, cwd, monkeypatch, capsys) -> tuple[int, str]:
    """Run a script's entry point, main(parse_args(Args, PRESETS, default_preset)), in this process on `argv`: it
    must stop with SystemExit before any run directory is made (--resume's own checks run inside open_run and must
    stop there). Returns (exit code, what the user was told: the SystemExit message or stderr). A bad input that
    got through fails at once instead of starting a run, and no Traceback can pass: only SystemExit is caught."""
    real_open_run = module.open_run

    def open_run(args, *rest):
        if args.resume:
            real_open_run(args, *rest)
        raise AssertionError(f"a run directory was about to be made for {argv}: the bad input got through")

    monkeypatch.setattr(module, "open_run", open_run)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    with pytest.raises(SystemExit) as stopped:
        module.main(module.parse_args(module.Args, module.PRESETS, module.default_preset))
    err = capsys.readouterr().err.strip()
    assert not os.path.exists(os.path.join(cwd, "runs")) or not os.listdir(os.path.join(cwd, "runs"))
    code = stopped.value.code
    return (1, code) if isinstance(code, str) else (code, err)
