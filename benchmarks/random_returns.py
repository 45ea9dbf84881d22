"""Mean return of the uniformly random policy through make_env, the floor every learning check is read against.

    python benchmarks/random_returns.py CartPole-v1 MinAtar/Breakout-v1 --episodes 100
    python benchmarks/random_returns.py dm_control/cartpole-swingup-v0 --action-repeat 8 --vectors

--vectors runs dm_control on its proprioceptive observations: the same dynamics and rewards without rendering.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from common.envs import make_env  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("env_ids", nargs="+")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--action-repeat", type=int, default=None, help="default: the env family's")
    p.add_argument("--vectors", action="store_true", help="dm_control without rendering")
    opt = p.parse_args()
    for env_id in opt.env_ids:
        env = make_env(env_id, 0, action_repeat=opt.action_repeat, pixels=False if opt.vectors else None)
        returns = []
        for ep in range(opt.episodes):
            env.reset(seed=ep)
            done, total = False, 0.0
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total, done = total + float(reward), terminated or truncated
            returns.append(total)
        print(f"{env_id}: random policy {np.mean(returns):.2f} ± {np.std(returns) / np.sqrt(len(returns)):.2f} "
              f"(mean ± s.e. over {len(returns)} episodes, action repeat {opt.action_repeat or 'default'})")
