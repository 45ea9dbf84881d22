"""Seconds per Plan2Explore update (world model + ensemble + exploration and task actor-critics), measured on the
real functions of algos/plan2explore.py.

    python benchmarks/plan2explore_throughput.py --preset small --env-id dm_control/cheetah-run-v0 [--bf16]
    python benchmarks/plan2explore_throughput.py --preset dmc --env-id dm_control/cheetah-run-v0

Process CPU time with torch.set_num_threads(1) (../shared/PERFORMANCE_TARGETS.md), median over `repeats`
after two warm-up repetitions, on random 64x64 RGB frames shaped like the env's. One update is
`train_update` with exploration on: the world model step, the ensemble step, and both actor-critics (two
15-step imaginations from all B×L posteriors). The zero-shot phase's update (`task_update`) is timed too.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import plan2explore as p2e  # noqa: E402
import torch  # noqa: E402

from benchmarks.timing import cpu_seconds, parse, peak_rss_gib, random_batch  # noqa: E402
from common.envs import make_env  # noqa: E402


def operations(preset: str, env_id: str, bf16: bool, device="cpu") -> tuple[str, dict]:
    """The script's exploration update and zero-shot update at `preset` on `device`, on random data:
    (description, {name: fn(i)})."""
    args = dataclasses.replace(p2e.Args(), preset=preset, env_id=env_id, bf16=bf16, **p2e.PRESETS[preset])
    env = make_env(env_id, 0)
    action_dim = env.action_space.shape[0]
    torch.manual_seed(0)
    wm = p2e.WorldModel(env.observation_space, action_dim, args)
    nets = dict(wm=wm, ensemble=p2e.Ensemble(args.ensemble_size, wm.feat_dim, action_dim, wm.embed_dim,
                                             args.ensemble_units or wm.embed_dim))
    for name in ("expl", "task"):
        nets[f"{name}_actor"] = p2e.Actor(wm.feat_dim, action_dim, args.units, args.action_init_std, args.action_mean_scale)
        nets[f"{name}_value"] = p2e.mlp(wm.feat_dim, 1, 3, args.units)
    nets = {k: v.to(device) for k, v in nets.items()}
    opts = {k: torch.optim.Adam(v.parameters(), 1e-4, eps=args.adam_eps) for k, v in nets.items()}
    batch = random_batch(env.observation_space, action_dim, False, args.batch_size, args.batch_length)
    batch = {k: v.to(device) for k, v in batch.items()}
    norm = p2e.RunningMagnitude()
    params = {k: sum(x.numel() for x in v.parameters()) / 1e6 for k, v in nets.items()}
    desc = (f"preset {preset}, {env_id} obs {env.observation_space.shape}, {action_dim}-dim actions, batch "
            f"{args.batch_size}x{args.batch_length}, deter {args.deter}, stoch {args.stoch}, units {args.units}, CNN depth "
            f"{args.cnn_depth}, ensemble {args.ensemble_size} x (2 x {args.ensemble_units or wm.embed_dim} → "
            f"{wm.embed_dim}), horizon {args.horizon}; parameters (M): " + ", ".join(f"{k} {v:.2f}" for k, v in params.items()))
    return desc, {"update": lambda i: p2e.train_update(nets, opts, batch, args, i, lambda: "", norm),
                  "zero-shot update": lambda i: p2e.task_update(nets, opts, batch, args, i, lambda: "")}


def main():
    opt = parse("small", "dm_control/cheetah-run-v0")
    desc, ops = operations(opt.preset, opt.env_id, opt.bf16)
    times = cpu_seconds(ops["update"], opt.repeats + 2)
    task = cpu_seconds(ops["zero-shot update"], opt.repeats + 2)
    print(f"{desc}; threads {opt.threads}, bf16 {opt.bf16}")
    print(f"update (world model + ensemble + both actor-critics): median {np.median(times[2:]):.2f} s CPU "
          f"(runs: {', '.join(f'{x:.2f}' for x in times[2:])})")
    print(f"zero-shot update (reward head + task actor-critic): median {np.median(task[2:]):.2f} s CPU; "
          f"peak RSS {peak_rss_gib():.2f} GiB")

if __name__ == "__main__":
    main()
