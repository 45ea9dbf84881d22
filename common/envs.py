"""Environment construction shared by every algorithm: one `make_env` for every env family.

Observations come out either as images, uint8 (C, H, W) with values 0..255, or as vectors,
float32 (D,). Continuous actions are rescaled to [-1, 1]. Rewards are left raw (clipping or
squashing is the algorithm's business) and `RecordEpisodeStatistics` sits where it sees whole,
unclipped episodes, so `info["episode"]` is the true return.

Families (CONVENTIONS.md §5):
  ALE/<Game>-v5                Dreamer/IRIS protocol: gymnasium's AtariPreprocessing (64x64,
                               frame skip 4 with max-pooling over the last two frames, up to 30
                               no-ops on reset), sticky actions 0.25 and the 108,000-frame limit
                               from ALE v5 itself; optional life loss as termination.
  dm_control/<domain>-<task>-v0  shimmy; 64x64 pixels from the rendered camera (2 for quadruped,
                               else 0) or the flattened proprioceptive vector; action repeat 2
                               (Dreamer) unless given, e.g. PLANET_ACTION_REPEAT.
  CarRacing-v3                 frames resized to 64x64.
  MinAtar/<Game>-v1            (C, 10, 10) binary channels scaled to {0, 255}.
  any other Box-observation id float32 vectors.
"""

import colorsys
import dataclasses
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the mujoco import

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import (
    AddRenderObservation,
    AtariPreprocessing,
    RecordEpisodeStatistics,
    RecordVideo,
    RepeatAction,
    ResizeObservation,
    TransformObservation,
)

# PlaNet's per-domain action repeat (Hafner et al. 2019, Table 1); Dreamer uses 2 everywhere.
PLANET_ACTION_REPEAT = {"cartpole": 8, "reacher": 4, "cheetah": 4, "cup": 4, "ball_in_cup": 4, "finger": 2, "walker": 2}
ATARI_FRAME_SKIP = 4
DMC_ACTION_REPEAT = 2


def env_family(env_id: str) -> str:
    """Which branch of make_env handles this id: 'atari', 'dmc', 'carracing', 'minatar' or 'gym'."""
    if env_id.startswith("ALE/"):
        return "atari"
    if env_id.startswith("dm_control/"):
        return "dmc"
    if env_id.startswith("CarRacing"):
        return "carracing"
    if env_id.startswith("MinAtar/"):
        return "minatar"
    return "gym"


def default_action_repeat(env_id: str) -> int:
    """Environment steps per agent step when the caller does not choose (Dreamer's protocol)."""
    return {"atari": ATARI_FRAME_SKIP, "dmc": DMC_ACTION_REPEAT}.get(env_family(env_id), 1)


def _register(family: str) -> None:
    if family == "atari":
        import ale_py

        gym.register_envs(ale_py)
    elif family == "dmc":
        import shimmy

        gym.register_envs(shimmy)
    elif family == "minatar":
        import minatar.gym

        if "MinAtar/Breakout-v1" not in gym.registry:
            minatar.gym.register_envs()


def _spec(env_id: str) -> gym.envs.registration.EnvSpec:
    try:
        return gym.spec(env_id)
    except (gym.error.NameNotFound, gym.error.NamespaceNotFound, gym.error.VersionNotFound, gym.error.UnregisteredEnv) as e:
        raise ValueError(f"Unknown environment id '{env_id}' ({e}).") from None


def _gym_make(env_id: str, **kwargs) -> gym.Env:
    """gym.make without its two per-step guard layers (the passive env checker and OrderEnforcing):
    every loop here resets before stepping, and on fast envs each wrapper layer costs 5-20% of the step."""
    return gym.make(dataclasses.replace(_spec(env_id), order_enforce=False, disable_env_checker=True), **kwargs)


class MinAtarImages(gym.Env):
    """A MinAtar game as (C, 10, 10) uint8 frames in {0, 255}, one layer over `minatar.Environment`.

    The game is the one minatar's registered id names (its kwargs: game, minimal action set for -v1, and
    minatar's default sticky actions 0.1). A MinAtar step costs about 2.5 µs through gym.make; minatar's gym
    class with a conversion layer and RecordEpisodeStatistics on top made it 5.2 µs, so the conversion lives in
    this one class instead (see benchmarks/env_replay_throughput.py)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, env_id: str, render_mode: str | None = None):
        import minatar

        kwargs = _spec(env_id).kwargs
        self.game = minatar.Environment(kwargs["game"])
        self.action_set = self.game.minimal_action_set() if kwargs.get("use_minimal_action_set") else list(range(self.game.num_actions()))
        h, w, c = self.game.state_shape()
        self.action_space = spaces.Discrete(len(self.action_set))
        self.observation_space = spaces.Box(0, 255, (c, h, w), np.uint8)
        self.render_mode = render_mode

    def _obs(self) -> np.ndarray:
        # bool (H, W, C) -> uint8 (C, H, W), 1 -> 255: the negation of a uint8 1 is 255, so one ufunc call on the
        # contiguous state, then a transposed view (0.54 µs; negating the transposed view took 0.93, a multiply
        # by 255 with a cast 1.22). The array keeps the state's (H, W, C) memory order.
        return (-self.game.state().view(np.uint8)).transpose(2, 0, 1)

    def step(self, action):
        reward, terminated = self.game.act(self.action_set[action])
        return self._obs(), reward, terminated, False, {}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.game.seed(seed)
        self.game.reset()
        return self._obs(), {}

    def render(self):
        """RGB (160, 160, 3): each cell 16×16 pixels in the colour of its highest 'on' channel, black if none."""
        state = self.game.state()
        c = state.shape[-1]
        palette = np.array([[0, 0, 0]] + [[255 * v for v in colorsys.hsv_to_rgb(i / c, 0.8, 1.0)] for i in range(c)], np.uint8)
        index = np.where(state.any(-1), c - np.argmax(state[..., ::-1], -1), 0)
        return palette[index].repeat(16, 0).repeat(16, 1)


def _channels_first(env: gym.Env) -> gym.Env:
    """(H, W, C) uint8 images -> (C, H, W) uint8."""
    h, w, c = env.observation_space.shape
    space = spaces.Box(0, 255, (c, h, w), np.uint8)
    return TransformObservation(env, lambda o: np.ascontiguousarray(np.transpose(o, (2, 0, 1))), space)


class LifeLossTermination(gym.Wrapper):
    """Signal termination when a life is lost, but only reset the emulator when the game is over.

    Dreamer/IRIS train with life loss as episode end. Wrapped outside RecordEpisodeStatistics, so
    logged returns are still whole games. A reset after a life loss takes one no-op step instead
    of restarting the game. (gymnasium's AtariPreprocessing(terminal_on_life_loss=True) would
    signal the end but leave the game running under a 'terminated' flag the caller must ignore.)
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._lives = 0
        self._game_over = True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self._lives:
            terminated = True
        self._lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, *, seed=None, options=None):
        if self._game_over or seed is not None:
            obs, info = self.env.reset(seed=seed, options=options)
        else:
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(options=options)
        self._game_over = False
        self._lives = self.env.unwrapped.ale.lives()
        return obs, info


def make_env(
    env_id: str,
    seed: int,
    *,
    pixels: bool | None = None,
    size: int = 64,
    grayscale: bool = False,
    action_repeat: int | None = None,
    life_loss: bool = False,
    capture_video: bool = False,
    video_dir: str | None = None,
) -> gym.Env:
    """Build one environment of any supported family (see the module docstring).

    pixels: None takes the family's default (images for ALE, dm_control, CarRacing, MinAtar;
    vectors for other ids); True/False demands one. grayscale: ALE only (1 channel instead of 3).
    action_repeat: None takes `default_action_repeat(env_id)`. life_loss: ALE only, training only.
    The caller seeds the episode stream with its first `env.reset(seed=seed)`; the action space is
    seeded here.
    """
    family = env_family(env_id)
    repeat = default_action_repeat(env_id) if action_repeat is None else int(action_repeat)
    if repeat < 1:
        raise ValueError(f"action_repeat must be at least 1, got {repeat}.")
    if life_loss and family != "atari":
        raise ValueError(f"life_loss applies to ALE games only, not '{env_id}'.")
    if grayscale and family not in ("atari",):
        raise ValueError(f"grayscale is an ALE option; '{env_id}' keeps its own channels.")
    _register(family)
    render_mode = "rgb_array" if capture_video else None

    if family == "atari":
        if pixels is False:
            raise ValueError(f"'{env_id}' only has pixel observations here (RAM observations are not supported).")
        # frameskip=1 in the base env: AtariPreprocessing repeats the action and max-pools the last
        # two frames. Sticky actions 0.25 and max_num_frames_per_episode=108000 are ALE v5 defaults.
        env = _gym_make(env_id, frameskip=1, repeat_action_probability=0.25, full_action_space=False,
                        max_num_frames_per_episode=108_000, render_mode=render_mode)
        env = AtariPreprocessing(env, noop_max=30, frame_skip=repeat, screen_size=size,
                                 grayscale_obs=grayscale, grayscale_newaxis=True, scale_obs=False)
        env = RecordEpisodeStatistics(env)
        if life_loss:
            env = LifeLossTermination(env)
        env = _channels_first(env)

    elif family == "dmc":
        domain = env_id.split("/")[1].split("-")[0]
        use_pixels = True if pixels is None else pixels
        camera = 2 if domain == "quadruped" else 0
        kwargs = dict(render_mode="rgb_array", render_kwargs=dict(width=size, height=size, camera_id=camera))
        env = _unit_actions(_gym_make(env_id, **kwargs))
        env = RepeatAction(env, repeat)  # before rendering: one frame per agent step
        if use_pixels:
            env = AddRenderObservation(env, render_only=True)
        else:
            env = _float32_vectors(env)  # flattens the dict of proprioceptive arrays
        env = RecordEpisodeStatistics(env)
        if use_pixels:
            env = _channels_first(env)

    elif family == "carracing":
        if pixels is False:
            raise ValueError(f"'{env_id}' only has pixel observations.")
        env = _unit_actions(_gym_make(env_id, render_mode=render_mode))
        if repeat > 1:
            env = RepeatAction(env, repeat)
        env = RecordEpisodeStatistics(env)
        env = _channels_first(ResizeObservation(env, (size, size)))

    elif family == "minatar":
        if pixels is False:
            raise ValueError(f"'{env_id}' only has image observations.")
        env = MinAtarImages(env_id, render_mode=render_mode)
        if repeat > 1:
            env = RepeatAction(env, repeat)
        env = RecordEpisodeStatistics(env)

    else:
        env = _gym_make(env_id, render_mode=render_mode)
        space = env.observation_space
        if not isinstance(space, spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"'{env_id}' has observation space {space}; make_env supports images from the "
                             "ALE, dm_control, CarRacing and MinAtar families and flat Box vectors otherwise.")
        if pixels:
            raise ValueError(f"'{env_id}' has no pixel observations here; pick an ALE/, dm_control/, "
                             "CarRacing or MinAtar/ id for an image-based algorithm.")
        if isinstance(env.action_space, spaces.Box) and np.all(np.isfinite(env.action_space.low)):
            env = _unit_actions(env)
        if repeat > 1:
            env = RepeatAction(env, repeat)
        env = RecordEpisodeStatistics(_float32_vectors(env))

    if not isinstance(env.action_space, (spaces.Discrete, spaces.Box)):
        raise ValueError(f"'{env_id}' has action space {env.action_space}; only Discrete and Box are supported.")
    if capture_video:
        env = RecordVideo(env, video_dir or "videos", episode_trigger=lambda ep: ep % 10 == 0, disable_logger=True)
    env.action_space.seed(seed)
    env.observation_space.seed(seed)
    return env


def _unit_actions(env: gym.Env) -> gym.Env:
    """Box actions in [-1, 1]: rescaled (as float32) unless the env's bounds already are exactly that
    (dm_control's are; its float64 dtype is kept rather than paying a casting layer per step)."""
    space = env.action_space
    if np.all(space.low == -1) and np.all(space.high == 1):
        return env
    # a = shift + scale · u for u in [-1, 1]: the affine map of gymnasium's RescaleAction, precomputed
    scale = ((space.high - space.low) / 2).astype(space.dtype)
    shift = ((space.high + space.low) / 2).astype(space.dtype)
    unit = spaces.Box(-1.0, 1.0, space.shape, np.float32)
    if np.any(shift):
        return gym.wrappers.TransformAction(env, lambda u: np.asarray(u, space.dtype) * scale + shift, unit)
    # symmetric bounds (Pendulum, MuJoCo): one ufunc call; on Pendulum the add and cast were 5% of a step
    return gym.wrappers.TransformAction(env, lambda u: np.multiply(u, scale, dtype=space.dtype), unit)


def _float32_vectors(env: gym.Env) -> gym.Env:
    """Observations as one flat float32 vector (dm_control's dict of float64 arrays, MuJoCo's float64);
    no layer when they already are."""
    space = env.observation_space
    if isinstance(space, spaces.Box) and space.dtype == np.float32 and len(space.shape) == 1:
        return env
    new = spaces.Box(-np.inf, np.inf, (spaces.flatdim(space),), np.float32)
    if isinstance(space, spaces.Dict):
        keys = list(space.keys())
        return TransformObservation(env, lambda o: np.concatenate([np.asarray(o[k], np.float32).ravel() for k in keys]), new)
    return TransformObservation(env, lambda o: np.asarray(o, np.float32).ravel(), new)


def is_image_space(space: gym.Space) -> bool:
    """True for the (C, H, W) uint8 observations make_env produces for pixel envs."""
    return isinstance(space, spaces.Box) and len(space.shape) == 3 and space.dtype == np.uint8
