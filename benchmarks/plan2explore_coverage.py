"""Plan2Explore learning check: state-space coverage of the exploration data against a random policy over the
same number of environment steps, and the zero-shot task return against the random policy's.

    python benchmarks/plan2explore_coverage.py benchmarks/runs/<point_mass run> benchmarks/plan2explore_point_mass.png

Coverage is the number of cells of a 20 × 20 grid over the point's (x, y) position in [-0.3, 0.3]² (the arena
of dm_control point_mass; the first two entries of its observation vector) that the stored observations
visited, counted as the run collected them. The random policy runs through make_env with the run's action
repeat for as many env steps and episodes, uniform actions, and its episodic returns are the floor for the
zero-shot return (read from the run's eval/zero_shot_return).
"""

import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from common.envs import make_env  # noqa: E402

BINS, LIMIT = 20, 0.3


def cells(positions: np.ndarray) -> np.ndarray:
    ij = np.clip(((positions + LIMIT) / (2 * LIMIT) * BINS).astype(int), 0, BINS - 1)
    return ij[:, 0] * BINS + ij[:, 1]


def coverage_curve(positions: np.ndarray) -> np.ndarray:
    """Cumulative count of distinct cells after each row."""
    seen, out = set(), []
    for c in cells(positions):
        seen.add(int(c))
        out.append(len(seen))
    return np.asarray(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("png")
    opt = p.parse_args()
    with open(os.path.join(opt.run_dir, "args.json")) as f:
        args = json.load(f)
    repeat = args["action_repeat"] or 2
    files = sorted(glob.glob(os.path.join(opt.run_dir, "episodes", "[0-9]" * 6 + "-*.npz")))
    obs = np.concatenate([np.load(f)["obs"] for f in files])[:, :2]
    explore_rows = args["total_timesteps"] // repeat  # the exploration phase only
    obs = obs[:explore_rows]
    ours = coverage_curve(obs)

    env = make_env(args["env_id"], 12345, pixels=False, action_repeat=repeat)
    o, _ = env.reset(seed=12345)
    rand_pos, returns, total = [o[:2]], [], 0.0
    while len(rand_pos) < len(obs):
        o, r, terminated, truncated, _ = env.step(env.action_space.sample())
        rand_pos.append(o[:2])
        total += float(r)
        if terminated or truncated:
            returns.append(total)
            total = 0.0
            o, _ = env.reset()
            rand_pos.append(o[:2])
    rand = coverage_curve(np.asarray(rand_pos[: len(obs)]))
    acc = EventAccumulator(opt.run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    zero_shot = [e.value for e in acc.Scalars("eval/zero_shot_return")]

    steps = np.arange(1, len(obs) + 1) * repeat
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(steps, ours, label="Plan2Explore exploration data")
    ax[0].plot(steps, rand, label="uniform random policy")
    ax[0].axvline(args["prefill"], ls=":", c="gray", label="end of the random prefill")
    ax[0].set(xlabel="environment steps", ylabel=f"visited cells of a {BINS}×{BINS} (x, y) grid", title="coverage")
    ax[0].legend()
    ax[1].bar(["random policy", "zero-shot task policy"], [np.mean(returns), np.mean(zero_shot)],
              yerr=[np.std(returns), np.std(zero_shot)], color=["gray", "C0"])
    ax[1].set(ylabel="episodic return", title=f"{args['env_id'].split('/')[-1]}: task return")
    fig.suptitle(f"Plan2Explore (small preset), {args['env_id']} vectors, 2-core CPU")
    fig.tight_layout()
    fig.savefig(opt.png, dpi=100)
    print(f"coverage after {steps[-1]} env steps: Plan2Explore {ours[-1]} cells, random {rand[-1]} cells "
          f"(of {BINS * BINS}); at the end of the prefill: {ours[args['prefill'] // repeat - 1]} vs "
          f"{rand[args['prefill'] // repeat - 1]}")
    print(f"zero-shot return {np.mean(zero_shot):.1f} ± {np.std(zero_shot):.1f} ({len(zero_shot)} episodes); random "
          f"{np.mean(returns):.1f} ± {np.std(returns):.1f} ({len(returns)} episodes)")


if __name__ == "__main__":
    main()
