"""Mean return of the uniformly random policy through make_env, the floor every learning check is read against.

    python benchmarks/random_returns.py CartPole-v1 MinAtar/Breakout-v1 --episodes 100
    python benchmarks/random_returns.py dm_control/cartpole-swingup-v0 --action-repeat 8 --vectors
    python benchmarks/random_returns.py CarRacing-v3 --episodes 20 --policy brownian

--vectors runs dm_control on its proprioceptive observations: the same dynamics and rewards without rendering.
--policy brownian replaces uniform actions by world_models_carracing.py's brownian random policy (its data policy).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))

import numpy as np  # noqa: E402

from common.envs import make_env  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("env_ids", nargs="+")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--action-repeat", type=int, default=None, help="default: the env family's")
    p.add_argument("--vectors", action="store_true", help="dm_control without rendering")
    p.add_argument("--policy", choices=("uniform", "brownian"), default="uniform")
    opt = p.parse_args()
    for env_id in opt.env_ids:
        env = make_env(env_id, 0, action_repeat=opt.action_repeat, pixels=False if opt.vectors else None)
        returns = []
        for ep in range(opt.episodes):
            env.reset(seed=ep)
            done, total, t = False, 0.0, 0
            if opt.policy == "brownian":
                from world_models_carracing import brownian_actions
                actions = brownian_actions(np.random.default_rng(ep), 100_000, 1 / 50)
            while not done:
                action = env.action_space.sample() if opt.policy == "uniform" else actions[t]
                _, reward, terminated, truncated, _ = env.step(action)
                total, done, t = total + float(reward), terminated or truncated, t + 1
            returns.append(total)
        print(f"{env_id}: random policy {np.mean(returns):.2f} ± {np.std(returns) / np.sqrt(len(returns)):.2f} "
              f"(mean ± s.e. over {len(returns)} episodes, action repeat {opt.action_repeat or 'default'}, {opt.policy} actions)")
