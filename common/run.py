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
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def choose_device(cuda: bool) -> torch.device:
    """CUDA if asked for and present, else the CPU (where freed memory is then kept for reuse, see below)."""
    device = torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")
    why = "" if device.type == "cuda" or not cuda else " (no CUDA device found)"
    print(f"device: {device}{why}")
    if device.type == "cpu":
        keep_freed_memory()
    return device


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


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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
    from the stored run's) stops with one sentence instead of a size-mismatch traceback."""
    state = torch.load(path, map_location=device, weights_only=False)
    set_rng_states(state["rng"])
    for name, obj in objects.items():
        try:
            obj.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError):
            raise SystemExit(f"Cannot resume: the {name} saved in '{os.path.dirname(path)}' does not fit the one these "
                             "settings build; pass the settings the run was started with (its args.json).") from None
    return state


class Progress:
    """The stdout line every `log_every` steps: step/total, SPS, ETA, latest return."""

    def __init__(self, total: int, start_step: int = 0):
        self.total, self.start_step, self.start_time = total, start_step, time.time()

    def sps(self, step: int) -> float:
        return (step - self.start_step) / max(time.time() - self.start_time, 1e-9)

    def line(self, step: int, last_return: float | None) -> str:
        sps = self.sps(step)
        eta = (self.total - step) / sps if sps > 0 else float("inf")
        ret = "-" if last_return is None else f"{last_return:.1f}"
        h, m = divmod(int(eta // 60), 60) if np.isfinite(eta) else (0, 0)
        return f"step {step}/{self.total}  SPS {sps:.0f}  ETA {h}h{m:02d}m  return {ret}"


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(losses: dict, step: int, save) -> None:
    """Stop the run at the first non-finite loss: call `save()` (a checkpoint), then raise naming it."""
    for name, value in losses.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            path = save()
            raise NonFiniteLoss(f"Non-finite loss '{name}' ({float(value)}) at update {step}; checkpoint saved to {path}.")


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
