"""Throughput of common/: make_env against the bare gymnasium pipeline doing the same work, and the
replay's resident memory against the bytes it holds.

    python benchmarks/env_replay_throughput.py            # prints a markdown table for RESULTS.md

Overhead ratio = (seconds per agent step through make_env) / (seconds per agent step through the bare
gymnasium env built with the same frames, frame skip and resizing but none of our wrappers), both
measured in this process in alternating blocks; the median over blocks is reported. MinAtar is measured twice:
against gym.make plus gymnasium's TransformObservation making the same uint8 (C, H, W) frames (the same-work
baseline, as for the other families), and against gym.make alone, which hands out minatar's bool (H, W, C)
state and so leaves our frame conversion out of the baseline.
"""

import os
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium.wrappers import AddRenderObservation, AtariPreprocessing, RepeatAction, ResizeObservation, TransformObservation  # noqa: E402

from common.envs import _register, make_env  # noqa: E402
from common.replay import Replay  # noqa: E402


def bare(env_id, pixels, minatar_frames=True):
    """The same simulation work with gymnasium's own pieces only (minatar_frames=False: MinAtar's bool state as is)."""
    if env_id.startswith("ALE/"):
        _register("atari")
        env = gym.make(env_id, frameskip=1, repeat_action_probability=0.25, full_action_space=False)
        return AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=64, grayscale_obs=True, grayscale_newaxis=True)
    if env_id.startswith("dm_control/"):
        _register("dmc")
        env = gym.make(env_id, render_mode="rgb_array", render_kwargs=dict(width=64, height=64, camera_id=0))
        env = RepeatAction(env, 2)
        return AddRenderObservation(env, render_only=True) if pixels else gym.wrappers.FlattenObservation(env)
    if env_id.startswith("MinAtar/"):
        _register("minatar")
        env = gym.make(env_id)
        if not minatar_frames:
            return env
        h, w, c = env.observation_space.shape
        # the conversion make_env's MinAtarImages applies, as a gymnasium TransformObservation layer
        return TransformObservation(env, lambda s: (-s.view(np.uint8)).transpose(2, 0, 1), gym.spaces.Box(0, 255, (c, h, w), np.uint8))
    if env_id.startswith("CarRacing"):
        return ResizeObservation(gym.make(env_id), (64, 64))
    return gym.make(env_id)


def seconds_per_step(env, steps, actions):
    env.reset(seed=0)
    t = time.perf_counter()
    for i in range(steps):
        _, _, terminated, truncated, _ = env.step(actions[i % len(actions)])
        if terminated or truncated:
            env.reset()
    return (time.perf_counter() - t) / steps


def env_overhead(env_id, pixels, steps, minatar_frames=True, blocks=5):
    ours = make_env(env_id, 0, pixels=pixels, grayscale=env_id.startswith("ALE/"))
    base = bare(env_id, pixels, minatar_frames)
    ours_actions = [ours.action_space.sample() for _ in range(64)]
    base_actions = [a if isinstance(a, (int, np.integer)) else np.asarray(a, base.action_space.dtype) for a in ours_actions]
    seconds_per_step(ours, steps // 4, ours_actions)  # warm-up
    seconds_per_step(base, steps // 4, base_actions)
    a, b = [], []
    for _ in range(blocks):
        a.append(seconds_per_step(ours, steps, ours_actions))
        b.append(seconds_per_step(base, steps, base_actions))
    return np.median(b), np.median(a), np.median(np.array(a) / np.array(b))


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def replay_memory(rows=100_000):
    frames = np.random.default_rng(0).integers(0, 256, (64, 3, 64, 64), dtype=np.uint8)
    action = np.zeros(6, np.float32)
    before = rss_bytes()
    replay = Replay(rows, None)
    for i in range(rows):
        replay.add(obs=frames[i % 64], action=action, reward=1.0, terminated=False, truncated=False, is_first=i % 1000 == 0)
    held = sum(arr[: len(replay)].nbytes for arr in replay.data.values())
    return held, rss_bytes() - before


if __name__ == "__main__":
    cases = [("ALE/Pong-v5", None, 2000, True), ("dm_control/cheetah-run-v0", True, 150, True),
             ("dm_control/cheetah-run-v0", False, 3000, True), ("CarRacing-v3", None, 300, True),
             ("MinAtar/Breakout-v1", None, 20000, True), ("MinAtar/Breakout-v1", None, 20000, False), ("Pendulum-v1", None, 20000, True)]
    print("| env | obs | bare gymnasium steps/s | make_env steps/s | overhead ratio (median of 5 blocks) |")
    print("|---|---|---:|---:|---:|")
    for env_id, pixels, steps, minatar_frames in cases:
        base, ours, ratio = env_overhead(env_id, pixels, steps, minatar_frames)
        kind = "vector" if pixels is False or env_id == "Pendulum-v1" else "pixels"
        if not minatar_frames:
            kind += " (bare: bool state, no conversion)"
        print(f"| {env_id} | {kind} | {1 / base:,.0f} | {1 / ours:,.0f} | {ratio:.3f} |", flush=True)
    held, resident = replay_memory()
    print(f"\nreplay, 100k rows of 3x64x64 uint8 + 6-dim actions: held {held / 2**20:.1f} MiB, "
          f"resident growth {resident / 2**20:.1f} MiB, ratio {resident / held:.3f}")
