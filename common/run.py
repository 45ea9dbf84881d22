"""Run bookkeeping shared by every algorithm: nothing here is part of any algorithm.

Command line with presets, run directory and resume checks, seeding, device choice, TensorBoard
writer with the hyperparameter table, atomic checkpoints with RNG states, the progress line, and
the non-finite-loss guard.
"""

import argparse
import ctypes
import dataclasses
import json
import os
import random
import sys
import time
from collections import deque

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter


def parse_args(args_cls, presets: dict[str, dict], default_preset) -> object:
    """Parse the command line into `args_cls` with a preset applied under the explicit flags.

    `presets` maps a preset name to field overrides; `default_preset(env_id)` names the preset
    used when `--preset` is not given. The preset's values become the defaults that tyro shows in
    --help, so any flag written on the command line wins over the preset.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--env-id", "--env_id", dest="env_id", default=args_cls.env_id)
    known, _ = pre.parse_known_args(sys.argv[1:])
    preset = known.preset or default_preset(known.env_id)
    if preset not in presets:
        raise SystemExit(f"Unknown preset '{preset}'; choose one of {', '.join(presets)}.")
    default = dataclasses.replace(args_cls(), preset=preset, **presets[preset])
    return tyro.cli(args_cls, default=default)


def require(args, allowed: str, ok, *names: str) -> None:
    """Stop before anything starts if a flag is out of its range: one sentence naming the flag, its value and the
    allowed range, and exit code 2 as for tyro's own errors. `ok(value)` says whether a value is allowed."""
    for name in names:
        value = getattr(args, name)
        if not ok(value):
            flag = "--" + name.rstrip("_").replace("_", "-") + "_" * (len(name) - len(name.rstrip("_")))
            print(f"error: {flag} {value} is out of range: it must be {allowed}.", file=sys.stderr)
            raise SystemExit(2)


def run_name(env_id: str, exp_name: str, seed: int) -> str:
    return f"{env_id.replace('/', '-')}__{exp_name}__{seed}__{int(time.time())}"


def open_run(args, root: str = "runs") -> tuple[str, bool]:
    """Return (run directory, resumed). A new run writes args.json; --resume checks it matches.

    A resumed run keeps its directory, episodes and TensorBoard file. It must name the same env,
    and every other hyperparameter is taken from the command line as given (a warning lists those
    that differ from the stored run).
    """
    if args.resume:
        run_dir = args.resume.rstrip("/")
        saved_path = os.path.join(run_dir, "args.json")
        if not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")) or not os.path.isfile(saved_path):
            raise SystemExit(f"Cannot resume: '{run_dir}' holds no checkpoint.pt and args.json from an earlier run.")
        with open(saved_path) as f:
            saved = json.load(f)
        if saved.get("exp_name") != args.exp_name:
            raise SystemExit(f"Cannot resume: '{run_dir}' is a run of {saved.get('exp_name')}, not {args.exp_name}.")
        if saved.get("env_id") != args.env_id:
            raise SystemExit(f"Cannot resume: '{run_dir}' was trained on {saved.get('env_id')}, not {args.env_id}; "
                             f"pass --env-id {saved.get('env_id')}.")
        now = dataclasses.asdict(args)
        changed = [k for k in saved if k not in ("resume",) and k in now and saved[k] != now[k]]
        if changed:
            print(f"resume: these settings differ from the stored run: {', '.join(changed)}")
        return run_dir, True
    os.makedirs(root, exist_ok=True)
    base = os.path.join(root, run_name(args.env_id, args.exp_name, args.seed))
    run_dir, n = base, 1
    while True:  # mkdir is atomic: two runs started in the same second get two directories, never one shared
        try:
            os.mkdir(run_dir)
            break
        except FileExistsError:
            n += 1
            run_dir = f"{base}_{n}"
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=1)
    return run_dir, False


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch (every device). With `deterministic`, cuDNN picks deterministic kernels and
    cuBLAS gets the fixed workspace it needs for reproducible matmuls (CUBLAS_WORKSPACE_CONFIG, read when cuBLAS
    starts: this runs before the first CUDA call); ops without a deterministic kernel warn."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def choose_device(cuda: bool) -> torch.device:
    """CUDA if asked for and present, else the CPU. On CUDA fp32 matmuls and convolutions use TF32 (10-bit
    mantissa, fp32 range; PyTorch's "high" precision); on the CPU freed memory is kept for reuse (see below)."""
    device = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
    why = "" if device.type == "cuda" or not cuda else " (no CUDA device found)"
    print(f"device: {device}{why}" + (f" ({torch.cuda.get_device_name(device)}, TF32 matmuls)" if device.type == "cuda" else ""))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # cuDNN's convolutions use TF32 by default already
    else:
        keep_freed_memory()
    return device


def to_device(arrays: dict, device) -> dict:
    """A batch of numpy arrays (or CPU tensors) as tensors on `device`. On CUDA each goes through pinned memory
    and is copied without blocking the host, so the upload overlaps the kernels already queued."""
    if torch.device(device).type != "cuda":
        return {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}
    return {k: torch.as_tensor(v).pin_memory().to(device, non_blocking=True) for k, v in arrays.items()}


def mean(values: list) -> float:
    """The mean of logged values: floats, or 0-d tensors kept on their device until the log line (reading each
    one as it is made would wait for the device at every update)."""
    if not values:
        return float("nan")
    tensors = [torch.as_tensor(v).detach().float().reshape(()) for v in values]
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    return float(torch.stack([t.to(device) for t in tensors]).mean())


def keep_freed_memory() -> bool:
    """Have glibc serve every allocation from its heap and keep what is freed there for the next allocation.

    PyTorch's CPU allocator keeps no cache, and glibc gives each block above its mmap threshold (at most 32 MiB)
    a fresh mapping that is page-faulted in on first touch and unmapped when freed, so every large activation
    was paid for in page faults again at every update (plan2explore's small update: 2.61 -> 1.75 s CPU; see
    benchmarks/RESULTS.md). The price is a higher peak resident size, since freed blocks stay mapped and not
    every later request fits a hole (2.0 -> 2.7 GiB there; 9.0 -> 16.2 GiB for plan2explore's paper-size
    update, which became 46 -> 27 s). Reuse is not guaranteed for every block (an aligned request asks for a
    little more than the hole the same request left), but over 30 plan2explore updates the peak stayed at 2.7 GiB
    and the update time flat. Returns False, changing nothing, where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def make_writer(run_dir: str, args, resumed: bool) -> SummaryWriter:
    writer = SummaryWriter(run_dir)
    if not resumed:
        table = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict, device="cpu") -> None:
    """Restore the states rng_states() saved. torch wants its generator states as CPU ByteTensors whatever the
    device they seed. The CUDA states are restored when the run is on CUDA; a checkpoint written on a GPU and
    resumed on a CPU skips them, saying so, and one written on a CPU leaves the CUDA generators as seeded."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" not in states:
        return
    if torch.device(device).type != "cuda":
        print("resume: the checkpoint's CUDA random states are skipped (this run is not on CUDA)")
        return
    cuda_states = [s.cpu() for s in states["cuda"]]
    n = torch.cuda.device_count()
    if len(cuda_states) != n:
        print(f"resume: the checkpoint has CUDA random states for {len(cuda_states)} devices, this machine {n}; "
              f"restoring the first {min(n, len(cuda_states))}")
    for i, state in enumerate(cuda_states[:n]):
        torch.cuda.set_rng_state(state, i)


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save `state` plus the global RNG states, atomically (temp file, fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save({**state, "rng": rng_states()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, device="cpu", **objects) -> dict:
    """Load a checkpoint written by save_checkpoint, restore the global RNG states from it and load each given
    module or optimizer from the entry of its name. One that does not fit (a network setting given differently
    from the stored run's) stops with one sentence instead of a size-mismatch traceback.

    Everything is read onto the CPU whatever the run's `device`: load_state_dict copies weights and optimizer
    state onto the device their module lives on, and the RNG states must stay CPU ByteTensors (mapped onto a GPU,
    torch.set_rng_state raises TypeError). So a checkpoint written on a CPU resumes on CUDA and the reverse."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_states(state["rng"], device)
    for name, obj in objects.items():
        try:
            obj.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError):
            raise SystemExit(f"Cannot resume: the {name} saved in '{os.path.dirname(path)}' does not fit the one these "
                             "settings build; pass the settings the run was started with (its args.json).") from None
    return state


class Progress:
    """The stdout line every `log_every` steps: phase, step/total, SPS, ETA, latest return.

    SPS and ETA come from the recent rate: the steps and seconds since the line `window` lines back, or since the
    current phase began if that is later. A run's phases go at very different speeds (a random prefill at
    thousands of steps/s, training at a few), so a rate averaged from the start of the run would give the
    prefill's ETA to the training phase. `sps()` (charts/SPS) stays the average since this process started."""

    def __init__(self, total: int, start_step: int = 0, phase: str = "train", window: int = 5):
        self.total, self.start_step, self.start_time = total, start_step, time.time()
        self.window = window
        self.start_phase(phase, start_step)

    def start_phase(self, phase: str, step: int) -> None:
        """Call where a phase begins (e.g. the first update after the prefill): its rate is measured from here."""
        self.phase = phase
        self.marks = deque([(time.time(), step)], maxlen=self.window)

    def sps(self, step: int) -> float:
        return (step - self.start_step) / max(time.time() - self.start_time, 1e-9)

    def line(self, step: int, last_return: float | None) -> str:
        now = time.time()
        then, step_then = self.marks[0]
        self.marks.append((now, step))
        sps = (step - step_then) / max(now - then, 1e-9)
        eta = (self.total - step) / sps if sps > 0 else float("inf")
        ret = "-" if last_return is None else f"{last_return:.1f}"
        if np.isfinite(eta):
            h, m = divmod(int(eta // 60), 60)
            eta_text = f"{h // 24}d{h % 24:02d}h{m:02d}m" if h >= 24 else f"{h}h{m:02d}m"
        else:
            eta_text = "-"
        return f"{self.phase}  step {step}/{self.total}  SPS {sps:.0f}  ETA {eta_text}  return {ret}"


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(losses: dict, step: int, save) -> None:
    """Stop the run at the first non-finite loss: call `save()` (a checkpoint), then raise naming it. The losses
    are checked as one stacked tensor: one host synchronisation however many there are (on CUDA each
    bool() of a device tensor waits for every queued kernel)."""
    values = [torch.as_tensor(v).detach().float().reshape(-1) for v in losses.values()]
    values = [v.to(values[0].device) for v in values]
    if bool(torch.isfinite(torch.cat(values)).all()):
        return
    name, value = next((n, v) for n, v in zip(losses, values) if not torch.isfinite(v).all())
    path = save()
    raise NonFiniteLoss(f"Non-finite loss '{name}' ({float(value[0]) if value.numel() == 1 else value.tolist()}) "
                        f"at update {step}; checkpoint saved to {path}.")


def add_video(writer: SummaryWriter, tag: str, video, step: int, fps: int = 10) -> None:
    """Log a uint8 video (T, C, H, W) as an animated GIF in TensorBoard's Images tab.

    torch's own add_video needs moviepy 1.x (moviepy.editor), which gymnasium's RecordVideo no longer
    uses; this writes the same GIF summary with Pillow.
    """
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    frames = np.asarray(video).transpose(0, 2, 3, 1)  # (T, H, W, C)
    if frames.shape[-1] == 1:
        frames = frames.repeat(3, -1)
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    t, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
