"""Mean return of the uniformly random policy through make_env, the floor every learning check is read against.

    python benchmarks/random_returns.py CartPole-v1 MinAtar/Breakout-v1 --episodes 100
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
    opt = p.parse_args()
    for env_id in opt.env_ids:
        env = make_env(env_id, 0)
        returns = []
        for ep in range(opt.episodes):
            env.reset(seed=ep)
            done, total = False, 0.0
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total, done = total + float(reward), terminated or truncated
            returns.append(total)
        print(f"{env_id}: random policy {np.mean(returns):.2f} ± {np.std(returns) / np.sqrt(len(returns)):.2f} "
              f"(mean ± s.e. over {len(returns)} episodes)")
