"""Goal-reaching environments with images, proprioception and settable states (for DINO-WM's offline data and
planning evaluation). Each is a small adapter with one interface; none is part of any algorithm.

    env = make_goal_env("PointMaze_UMaze-v3" | "PushT-v0" | "Wall-v0", size=64)
    frame, proprio = env.reset(seed)      # frame uint8 (3, size, size), proprio float32 (P,)
    frame, proprio = env.step(action)     # action float in [-1, 1]^A
    state = env.state()                   # the full simulator state, float64
    frame, proprio = env.set_state(state)
    env.success(goal_state)               # the goal test of the environment (see each class)

Every action space is [-1, 1]^2: PointMaze's force, Wall's velocity (2 px per step at 1), and for PushT a
displacement of the agent's target position (32 px at 1, from the agent's position) instead of gym-pusht's
absolute target in [0, 512]², so that a random policy moves the agent smoothly.
"""

import os

import numpy as np

GOAL_ENV_IDS = ("PointMaze_UMaze-v3", "PushT-v0", "Wall-v0")


def make_goal_env(env_id: str, size: int = 64):
    if env_id == "PointMaze_UMaze-v3":
        return PointMaze(size)
    if env_id == "PushT-v0":
        return PushT(size)
    if env_id == "Wall-v0":
        return Wall(size)
    raise ValueError(f"Unknown goal-reaching env id '{env_id}'; choose one of {', '.join(GOAL_ENV_IDS)}.")


def _chw(frame: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size), resized with area averaging when the sizes differ."""
    if frame.shape[0] != size:
        import cv2
        frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(frame.transpose(2, 0, 1))


class PointMaze:
    """gymnasium-robotics PointMaze_UMaze-v3 rendered from its default camera; proprio = (x, y, vx, vy).
    Success: the ball within 0.45 of the goal position, PointMaze's own `success` distance."""

    proprio_dim, action_dim = 4, 2

    def __init__(self, size: int):
        os.environ.setdefault("MUJOCO_GL", "egl")
        import gymnasium as gym
        import gymnasium_robotics
        gym.register_envs(gymnasium_robotics)
        self.size = size
        self.env = gym.make("PointMaze_UMaze-v3", render_mode="rgb_array", width=size, height=size,
                            continuing_task=True, reset_target=False, max_episode_steps=10**9)
        self.point = self.env.unwrapped.point_env

    def _obs(self):
        return _chw(self.env.render(), self.size), self.state().astype(np.float32)

    def reset(self, seed: int):
        self.env.reset(seed=seed)
        return self._obs()

    def step(self, action):
        self.env.step(np.clip(np.asarray(action, np.float32), -1, 1))
        return self._obs()

    def state(self) -> np.ndarray:
        return np.concatenate([self.point.data.qpos, self.point.data.qvel]).astype(np.float64)

    def set_state(self, state):
        self.point.set_state(np.asarray(state[:2]), np.asarray(state[2:4]))
        return self._obs()

    def success(self, goal_state) -> bool:
        return bool(np.linalg.norm(self.state()[:2] - np.asarray(goal_state)[:2]) <= 0.45)

    def close(self):
        self.env.close()


class PushT:
    """gym-pusht's PushT with pixels and the agent's position; state = (agent x, y, block x, y, angle).
    Success: DINO-WM's test against a goal state (block and agent within 20 px in total, angle within π/9);
    gym-pusht's own coverage test only knows its fixed goal pose."""

    proprio_dim, action_dim = 2, 2

    def __init__(self, size: int):
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
        import gymnasium as gym
        self.size = size
        self.env = gym.make("gym_pusht/PushT-v0", obs_type="pixels_agent_pos", render_mode="rgb_array",
                            max_episode_steps=10**9)
        self.last = None

    def _obs(self, obs):
        self.last = obs
        return _chw(obs["pixels"], self.size), (obs["agent_pos"] / 512.0).astype(np.float32)

    def reset(self, seed: int):
        return self._obs(self.env.reset(seed=seed)[0])

    def step(self, action):
        target = self.last["agent_pos"] + 32.0 * np.clip(np.asarray(action, np.float64), -1, 1)
        return self._obs(self.env.step(np.clip(target, 0, 512))[0])

    def state(self) -> np.ndarray:
        u = self.env.unwrapped
        return np.array([*u.agent.position, *u.block.position, u.block.angle % (2 * np.pi)], np.float64)

    def set_state(self, state):
        """Exactly `state`, at rest. (gym-pusht's reset_to_state sets the block's angle after its position, which
        rotates the block about its centre of mass and moves it.)"""
        u = self.env.unwrapped
        u.block.angle = float(state[4])
        u.block.position = (float(state[2]), float(state[3]))
        u.agent.position = (float(state[0]), float(state[1]))
        u.agent.velocity = u.block.velocity = (0.0, 0.0)
        u.block.angular_velocity = 0.0
        u.space.reindex_shapes_for_body(u.block)
        u.space.reindex_shapes_for_body(u.agent)
        return self._obs(u.get_obs())

    def success(self, goal_state) -> bool:
        s, g = self.state(), np.asarray(goal_state)
        angle = abs(s[4] - g[4]) % (2 * np.pi)
        return bool(np.linalg.norm(s[:4] - g[:4]) < 20 and min(angle, 2 * np.pi - angle) < np.pi / 9)

    def close(self):
        self.env.close()


class Wall:
    """A 2-D room (64×64 units) split by a vertical wall at x = 32 with one door, as in DINO-WM's Wall task:
    a dot moved by velocity actions (2 units per step at 1) cannot cross the wall outside the door.
    proprio = position / 64. The door's centre is drawn per episode in [16, 48]. Success: within 4 units."""

    proprio_dim, action_dim = 2, 2
    WALL_X, WALL_HALF, DOOR_HALF, SPEED = 32.0, 1.0, 6.0, 2.0

    def __init__(self, size: int):
        self.size = size
        self.rng = np.random.default_rng(0)
        self.pos, self.door = np.zeros(2), 32.0

    def _blocked(self, old, new) -> bool:
        lo, hi = self.WALL_X - self.WALL_HALF, self.WALL_X + self.WALL_HALF
        crosses = (min(old[0], new[0]) <= hi) and (max(old[0], new[0]) >= lo)
        return crosses and abs(new[1] - self.door) > self.DOOR_HALF

    def _obs(self):
        s = self.size / 64.0
        ys, xs = np.mgrid[0:self.size, 0:self.size] / s + 0.5 / s
        img = np.full((self.size, self.size, 3), 255, np.uint8)
        wall = (np.abs(xs - self.WALL_X) <= self.WALL_HALF) & (np.abs(ys - self.door) > self.DOOR_HALF)
        img[wall] = (40, 40, 40)
        img[(xs - self.pos[0]) ** 2 + (ys - self.pos[1]) ** 2 <= 2.5**2] = (220, 30, 30)
        return img.transpose(2, 0, 1).copy(), (self.pos / 64.0).astype(np.float32)

    def reset(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.door = float(self.rng.uniform(16, 48))
        self.pos = np.array([self.rng.uniform(4, 28), self.rng.uniform(4, 60)])
        return self._obs()

    def step(self, action):
        new = np.clip(self.pos + self.SPEED * np.clip(np.asarray(action, np.float64), -1, 1), 2, 62)
        if not self._blocked(self.pos, new):
            self.pos = new
        return self._obs()

    def state(self) -> np.ndarray:
        return np.array([*self.pos, self.door], np.float64)

    def set_state(self, state):
        self.pos, self.door = np.array(state[:2], np.float64), float(state[2])
        return self._obs()

    def success(self, goal_state) -> bool:
        return bool(np.linalg.norm(self.pos - np.asarray(goal_state)[:2]) < 4.0)

    def close(self):
        pass
