"""Tests of common/: environments, episode storage and its alignment, run bookkeeping."""

import ast
import dataclasses
import json
import os
import random
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

from common.envs import make_env
from common.replay import Replay, load_episode
from common.run import (
    NonFiniteLoss, Progress, check_finite, load_checkpoint, open_run, parse_args, save_checkpoint, set_rng_states,
)


# Environments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id, kwargs, shape, n_actions", [
    ("ALE/Pong-v5", dict(grayscale=True), (1, 64, 64), 6),
    ("ALE/Pong-v5", dict(), (3, 64, 64), 6),
    ("dm_control/cheetah-run-v0", dict(), (3, 64, 64), (6,)),
    ("dm_control/cheetah-run-v0", dict(pixels=False), (17,), (6,)),
    ("CarRacing-v3", dict(), (3, 64, 64), (3,)),
    ("MinAtar/Breakout-v1", dict(), (4, 10, 10), 3),
    ("Pendulum-v1", dict(), (3,), (1,)),
])
def test_env_families_shapes_dtypes_ranges(env_id, kwargs, shape, n_actions):
    env = make_env(env_id, 0, **kwargs)
    obs, _ = env.reset(seed=0)
    image = len(shape) == 3
    assert env.observation_space.shape == shape and obs.shape == shape
    assert obs.dtype == (np.uint8 if image else np.float32)
    for _ in range(5):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert obs.shape == shape and obs.dtype == (np.uint8 if image else np.float32)
        assert isinstance(terminated, (bool, np.bool_)) and isinstance(truncated, (bool, np.bool_))
    if image:
        assert obs.max() > 0, "an all-black frame: rendering or preprocessing is broken"
    if isinstance(n_actions, int):
        assert isinstance(env.action_space, gym.spaces.Discrete) and env.action_space.n == n_actions
    else:
        assert env.action_space.shape == n_actions
        assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    env.close()


def test_continuous_actions_are_rescaled_from_unit_range():
    env = make_env("Pendulum-v1", 0)  # torque bounds [-2, 2]
    env.reset(seed=0)
    for u, torque in [(1.0, 2.0), (-1.0, -2.0), (0.25, 0.5)]:
        env.step(np.array([u], np.float32))
        assert env.unwrapped.last_u == pytest.approx(torque)


def test_minatar_plays_the_registered_game_as_channels_first_frames_of_0_or_255():
    import minatar.gym  # noqa: F401  (registered by make_env)

    ours, theirs = make_env("MinAtar/SpaceInvaders-v1", 0), gym.make("MinAtar/SpaceInvaders-v1")
    assert ours.action_space == theirs.action_space  # the minimal action set of the -v1 id
    obs, _ = ours.reset(seed=3)
    ref, _ = theirs.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(300):  # same seed and actions: the same game, sticky actions included
        assert obs.shape == (ref.shape[2], 10, 10) and set(np.unique(obs)) <= {0, 255}
        np.testing.assert_array_equal(obs, ref.transpose(2, 0, 1).astype(np.uint8) * 255)
        a = int(rng.integers(ours.action_space.n))
        obs, r, term, trunc, _ = ours.step(a)
        ref, r_ref, term_ref, trunc_ref, _ = theirs.step(a)
        assert (r, term, trunc) == (r_ref, term_ref, trunc_ref)
        if term:
            obs, _ = ours.reset()
            ref, _ = theirs.reset()


def test_action_repeat_sums_rewards_and_stops_at_termination():
    raw = gym.make("CartPole-v1")
    raw.reset(seed=3)
    n = 0
    while True:  # always push right: CartPole falls after a few dozen steps, +1 per step
        n += 1
        _, _, terminated, truncated, _ = raw.step(1)
        if terminated or truncated:
            break
    env = make_env("CartPole-v1", 3, action_repeat=4)
    env.reset(seed=3)
    rewards, done = [], False
    while not done:
        _, reward, terminated, truncated, _ = env.step(1)
        rewards.append(reward)
        done = terminated or truncated
    assert terminated and not truncated
    assert sum(rewards) == n  # no step lost or added past the termination
    assert rewards[:-1] == [4.0] * (len(rewards) - 1) and 1 <= rewards[-1] <= 4
    assert len(rewards) == -(-n // 4)


def test_atari_protocol_sticky_actions_frame_skip_time_limit():
    env = make_env("ALE/Pong-v5", 0, grayscale=True)
    ale = env.unwrapped.ale
    assert ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert ale.getInt("max_num_frames_per_episode") == 108_000
    env.reset(seed=0)
    frames = ale.getEpisodeFrameNumber()
    env.step(0)
    assert ale.getEpisodeFrameNumber() - frames == 4


def test_termination_and_truncation_kept_apart():
    env = make_env("Pendulum-v1", 0)  # no terminal state, 200-step time limit
    env.reset(seed=0)
    flags = [env.step(env.action_space.sample())[2:4] for _ in range(200)]
    assert flags[-1] == (False, True) and not any(t for t, _ in flags)
    env = make_env("dm_control/cartpole-swingup-v0", 0, pixels=False)  # 1000 physics steps / repeat 2
    env.reset(seed=0)
    flags = [env.step(env.action_space.sample())[2:4] for _ in range(500)]
    assert flags[-1] == (False, True) and not any(t for t, _ in flags[:-1]) and not any(t for t, _ in flags)


def test_life_loss_terminates_without_restarting_the_game():
    env = make_env("ALE/Breakout-v5", 0, life_loss=True)
    env.reset(seed=0)
    ale = env.unwrapped.ale
    lives, done, steps, info = ale.lives(), False, 0, {}
    while not done:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        done, steps = terminated or truncated, steps + 1
    assert terminated and ale.lives() == lives - 1 and "episode" not in info  # the game goes on
    env.reset()
    assert ale.lives() == lives - 1  # a soft reset, not a new game


@pytest.mark.parametrize("env_id, kwargs, words", [
    ("NoSuchEnv-v0", {}, "Unknown environment id"),
    ("ALE/NoSuchGame-v5", {}, "Unknown environment id"),
    ("FrozenLake-v1", {}, "observation space"),
    ("Pendulum-v1", dict(pixels=True), "no pixel observations"),
    ("ALE/Pong-v5", dict(pixels=False), "only has pixel observations"),
])
def test_bad_env_requests_get_one_clear_sentence(env_id, kwargs, words):
    with pytest.raises(ValueError, match=words):
        make_env(env_id, 0, **kwargs)


# Replay ----------------------------------------------------------------------------------------
class CounterEnv(gym.Env):
    """obs after k steps is k; the step that returns obs k pays reward 10k; episodes last `lengths`."""

    observation_space = gym.spaces.Box(0, 1e6, (1,), np.float32)
    action_space = gym.spaces.Box(0, 1e6, (1,), np.float32)

    def __init__(self, lengths):
        self.lengths, self.episode = list(lengths), -1

    def reset(self, *, seed=None, options=None):
        self.k, self.episode = 0, self.episode + 1
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.k += 1
        done = self.k == self.lengths[self.episode % len(self.lengths)]
        return np.array([self.k], np.float32), 10.0 * self.k, done and self.episode % 2 == 0, done and self.episode % 2 == 1, {}


def fill(replay, lengths, episodes):
    """The loop every algorithm runs: store the reset row, then one row per step (common/replay.py)."""
    env = CounterEnv(lengths)
    for _ in range(episodes):
        obs, _ = env.reset()
        replay.add(obs=obs, action=np.zeros(1, np.float32), reward=0.0, terminated=False, truncated=False, is_first=True)
        done = False
        while not done:
            action = obs.copy()  # the agent's choice encodes the observation it was made at
            obs, reward, terminated, truncated, _ = env.step(action)
            replay.add(obs=obs, action=action, reward=reward, terminated=terminated, truncated=truncated, is_first=False)
            done = terminated or truncated


def test_documented_alignment_in_sampled_chunks(tmp_path):
    replay = Replay(10_000, str(tmp_path), seed=0)
    fill(replay, [3, 7, 5, 2], episodes=12)
    batch = replay.sample(64, 9)
    t = batch["obs"][..., 0]
    first = batch["is_first"]
    assert batch["obs"].shape == (64, 9, 1)
    # row t: obs o_t, the action chosen at o_{t-1}, the reward paid by the step that returned o_t
    np.testing.assert_array_equal(batch["action"][..., 0][~first], t[~first] - 1)
    np.testing.assert_array_equal(batch["reward"][~first], 10 * t[~first])
    np.testing.assert_array_equal(batch["action"][first], 0)
    np.testing.assert_array_equal(batch["reward"][first], 0)
    # is_first marks every reset inside a chunk, and nothing else
    np.testing.assert_array_equal(first, t == 0)
    assert first[:, 1:].any(), "chunks should cross episode boundaries"
    # consecutive rows inside an episode are consecutive steps
    step = np.diff(t, axis=1)
    np.testing.assert_array_equal(step[~first[:, 1:]], 1)
    # the flags sit on the last row only: even episodes terminate, odd ones are truncated
    last = batch["terminated"] | batch["truncated"]
    assert not (batch["terminated"] & batch["truncated"]).any()
    assert (~last[:, :-1] | first[:, 1:]).all()


def test_sampling_reaches_the_newest_rows():
    replay = Replay(10_000, None, seed=0)
    fill(replay, [4], episodes=5)
    newest = {float(o) for o in replay.sample(2000, 3)["obs"][:, -1, 0]}
    assert newest == {0.0, 1.0, 2.0, 3.0, 4.0}
    assert replay.sample(2000, 3)["obs"][:, -1, 0].max() == 4  # the very last row is drawn


def test_episode_files_round_trip_and_temp_files_ignored(tmp_path):
    replay = Replay(10_000, str(tmp_path), seed=0)
    fill(replay, [3, 5], episodes=4)
    names = sorted(os.listdir(tmp_path))
    assert names == ["000000-4.npz", "000001-6.npz", "000002-4.npz", "000003-6.npz"]
    episode = load_episode(os.path.join(tmp_path, "000001-6.npz"))
    assert set(episode) == {"obs", "action", "reward", "terminated", "truncated", "is_first"}
    np.testing.assert_array_equal(episode["obs"][:, 0], np.arange(6))
    assert episode["truncated"][-1] and not episode["terminated"].any() and episode["is_first"][0]
    (tmp_path / "000004-9.npz.tmp").write_bytes(b"half a file")
    loaded = Replay(10_000, str(tmp_path), seed=0)
    assert loaded.load() == 20
    for k in replay.data:
        np.testing.assert_array_equal(loaded.data[k][:20], replay.data[k][:20])


def test_unfinished_episode_survives_a_stop(tmp_path):
    replay = Replay(10_000, str(tmp_path), seed=0)
    fill(replay, [3], episodes=1)
    replay.add(obs=np.zeros(1, np.float32), action=np.zeros(1, np.float32), reward=0.0, terminated=False, truncated=False, is_first=True)
    replay.add(obs=np.ones(1, np.float32), action=np.zeros(1, np.float32), reward=10.0, terminated=False, truncated=False, is_first=False)
    replay.save_partial()  # what a checkpoint does; then the process is killed
    resumed = Replay(10_000, str(tmp_path), seed=0)
    assert resumed.load() == 6
    fill(resumed, [2], episodes=1)  # the resumed run's episodes must not overwrite the old partial
    resumed.save_partial()
    again = Replay(10_000, str(tmp_path), seed=0)
    assert again.load() == 9
    np.testing.assert_array_equal(again.data["obs"][:9, 0], [0, 1, 2, 3, 0, 1, 0, 1, 2])


def test_fifo_eviction_by_step_capacity(tmp_path):
    replay = Replay(10, str(tmp_path), seed=0)
    fill(replay, [4], episodes=5)  # 25 rows
    assert len(replay) == 10
    held = replay.sample(500, 10)["obs"][..., 0]
    np.testing.assert_array_equal(held[0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4])  # the newest 10, in order
    small = Replay(7, None)
    assert small.load(str(tmp_path)) == 25 and len(small) == 7  # loading respects the capacity too
    np.testing.assert_array_equal(small.sample(1, 7)["obs"][0, :, 0], [3, 4, 0, 1, 2, 3, 4])


def test_images_stay_uint8():
    replay = Replay(100, None)
    replay.add(obs=np.full((3, 8, 8), 200, np.uint8), action=np.zeros(2, np.float32), reward=0.0,
               terminated=False, truncated=False, is_first=True)
    assert replay.data["obs"].dtype == np.uint8 and replay.data["obs"].nbytes == 100 * 3 * 8 * 8


# Run bookkeeping -----------------------------------------------------------------------------
def test_checkpoint_round_trip_restores_the_random_streams(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 7})
    draws = (random.random(), np.random.rand(3), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    state = load_checkpoint(path)
    assert state["step"] == 7 and not os.path.exists(path + ".tmp")
    assert random.random() == draws[0]
    np.testing.assert_array_equal(np.random.rand(3), draws[1])
    assert torch.equal(torch.rand(3), draws[2])


def test_checkpoint_resumes_on_another_device_with_the_rng_states_on_the_cpu(tmp_path):
    # A run on CUDA passes its device to load_checkpoint; mapping the checkpoint onto it moved the saved RNG
    # ByteTensors off the CPU and torch.set_rng_state raised TypeError. The meta device reproduces that here.
    path = str(tmp_path / "checkpoint.pt")
    net = torch.nn.Linear(3, 4)
    torch.manual_seed(5)
    save_checkpoint(path, {"net": net.state_dict()})
    draw = torch.rand(2)
    torch.manual_seed(6)
    same = torch.nn.Linear(3, 4)
    load_checkpoint(path, "meta", net=same)
    assert torch.equal(torch.rand(2), draw) and torch.equal(same.weight, net.weight)


def test_cuda_random_states_are_skipped_with_a_line_when_the_run_is_not_on_cuda(capsys):
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "cuda": [torch.get_rng_state()]}  # as a GPU machine writes them; never handed to CUDA here
    set_rng_states(states, "cpu")
    assert "CUDA random states are skipped" in capsys.readouterr().out


def test_progress_eta_comes_from_the_recent_rate_of_the_current_phase(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("common.run.time.time", lambda: clock[0])
    progress = Progress(1_000_000, 0, "prefill")
    clock[0] = 10.0
    assert progress.line(100_000, None).startswith("prefill  step 100000/1000000  SPS 10000  ETA 0h01m")
    clock[0] = 20.0
    progress.start_phase("train", 200_000)  # training goes at 100 steps/s from here
    for i in range(1, 8):
        clock[0] = 20.0 + 100.0 * i
        line = progress.line(200_000 + 10_000 * i, 1.5)
    remaining = 1_000_000 - 270_000
    assert line.startswith(f"train  step 270000/1000000  SPS 100  ETA {remaining // 100 // 3600}h")
    assert line.endswith("return 1.5")
    assert progress.sps(270_000) == 270_000 / 720.0  # charts/SPS: since this process started


def test_checkpoint_loads_named_objects_and_a_mismatched_one_stops_with_one_sentence(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    net = torch.nn.Linear(3, 4)
    save_checkpoint(path, {"net": net.state_dict()})
    same = torch.nn.Linear(3, 4)
    load_checkpoint(path, net=same)
    assert torch.equal(same.weight, net.weight) and torch.equal(same.bias, net.bias)
    with pytest.raises(SystemExit, match="Cannot resume: the net saved in .* does not fit the one these settings build"):
        load_checkpoint(path, net=torch.nn.Linear(3, 5))  # e.g. resumed with a different width


def test_non_finite_guard_saves_then_names_the_loss_and_step():
    saved = []
    check_finite({"a": torch.tensor(1.0)}, 3, lambda: saved.append(1))
    assert not saved
    with pytest.raises(NonFiniteLoss, match="'critic_loss'.*update 12"):
        check_finite({"model_loss": torch.tensor(1.0), "critic_loss": torch.tensor(float("nan"))}, 12,
                     lambda: saved.append(1) or "ckpt")
    assert saved == [1]


@dataclasses.dataclass
class ToyArgs:
    exp_name: str = "toy"
    env_id: str = "CartPole-v1"
    preset: str = "a"
    seed: int = 0
    lr: float = 1.0
    units: int = 8
    resume: str | None = None


def test_preset_applies_and_explicit_flags_win(monkeypatch):
    presets = {"a": {}, "b": dict(lr=2.0, units=16)}
    pick = lambda env_id: "b" if env_id.startswith("ALE/") else "a"  # noqa: E731
    monkeypatch.setattr(sys, "argv", ["x", "--env-id", "ALE/Pong-v5"])
    args = parse_args(ToyArgs, presets, pick)
    assert (args.preset, args.lr, args.units) == ("b", 2.0, 16)
    monkeypatch.setattr(sys, "argv", ["x", "--env-id", "ALE/Pong-v5", "--units", "8"])
    assert parse_args(ToyArgs, presets, pick).units == 8  # explicit flag equal to the base default still wins
    monkeypatch.setattr(sys, "argv", ["x", "--preset", "b", "--lr", "3"])
    args = parse_args(ToyArgs, presets, pick)
    assert (args.env_id, args.lr, args.units) == ("CartPole-v1", 3.0, 16)


def test_resume_checks_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir, resumed = open_run(ToyArgs())
    assert not resumed and os.path.isfile(os.path.join(run_dir, "args.json"))
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        open_run(ToyArgs(resume=run_dir))
    save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), {})
    assert open_run(ToyArgs(resume=run_dir)) == (run_dir, True)
    with pytest.raises(SystemExit, match="trained on CartPole-v1, not Pendulum-v1"):
        open_run(ToyArgs(resume=run_dir, env_id="Pendulum-v1"))
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        open_run(ToyArgs(resume=str(tmp_path / "missing")))


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    first, second = open_run(ToyArgs()), open_run(ToyArgs(lr=2.0))
    assert first[0] != second[0] and second[0] == first[0] + "_2"
    with open(os.path.join(first[0], "args.json")) as f:
        assert json.load(f)["lr"] == ToyArgs().lr  # the second run did not overwrite the first's settings


PAGE_FAULTS_OF_REPEATED_64_MIB_TENSORS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from common.run import keep_freed_memory
if {keep} and not keep_freed_memory():
    print("not glibc"); sys.exit()
def faults():  # one 64 MiB tensor, over glibc's largest mmap threshold (32 MiB), made and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20, dtype=torch.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print([faults() for _ in range(6)])
"""


def test_keep_freed_memory_lets_a_large_block_be_reused_without_page_faults():
    # in a fresh interpreter: what a process has allocated before (ale_py's libraries, say) decides which freed
    # holes fit a later aligned request, so only a clean heap gives a reproducible count
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    counts = {}
    for keep in (False, True):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_REPEATED_64_MIB_TENSORS.format(root=root, keep=keep)],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if "not glibc" in out.stdout:
            pytest.skip("the C library is not glibc")
        counts[keep] = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert min(counts[False]) > 16_000, counts  # a fresh mapping every time: 64 MiB of 4 KiB pages
    # the heap grows while the first ones run (up to four, by where the first holes fall), then its holes are reused
    assert max(counts[True][4:]) < 100, counts
