"""Seconds per PlaNet update and per planned action, measured on the real functions of algos/planet.py.

    python benchmarks/planet_throughput.py --preset dmc --env-id dm_control/cheetah-run-v0 --repeats 5 [--bf16]
    python benchmarks/planet_throughput.py --preset small --env-id dm_control/cartpole-swingup-v0

Process CPU time with torch.set_num_threads(1) (../shared/PERFORMANCE_TARGETS.md), median over `repeats`
after two warm-up repetitions, on random data shaped like the env's observations. An update is one
world-model gradient step on B×L (overshooting as the preset sets it, off by default). A planned action
is `Planner.act`: encode the frame, one filter step, and the whole CEM search. Peak resident memory is
the process's ru_maxrss.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import planet as p  # noqa: E402
from benchmarks.timing import cpu_seconds, parse, peak_rss_gib, random_batch  # noqa: E402
from common.envs import make_env  # noqa: E402


def operations(preset: str, env_id: str, bf16: bool, device="cpu") -> tuple[str, dict]:
    """The script's update and planned action at `preset` on `device`, on random data: (description, {name: fn(i)})."""
    args = dataclasses.replace(p.Args(), preset=preset, env_id=env_id, bf16=bf16, **p.PRESETS[preset])
    env = make_env(env_id, 0, action_repeat=p.planet_action_repeat(env_id))
    action_dim = env.action_space.shape[0]
    torch.manual_seed(0)
    wm = p.WorldModel(env.observation_space, action_dim, args).to(device)
    opt_ = torch.optim.Adam(wm.parameters(), args.model_lr, eps=args.adam_eps)
    B, T = args.batch_size, args.batch_length
    batch = {k: v.to(device) for k, v in random_batch(env.observation_space, action_dim, False, B, T).items()}
    planner = p.Planner(wm, action_dim, args, torch.device(device))
    o, _ = env.reset(seed=0)
    params = sum(x.numel() for x in wm.parameters())
    desc = (f"preset {preset}, {env_id} obs {env.observation_space.shape}, {action_dim}-dim actions, batch {B}x{T}, "
            f"deter {args.deter}, stoch {args.stoch}, hidden {args.hidden}, CNN depth {args.cnn_depth}, "
            f"{params / 1e6:.2f}M parameters; planner H {args.planning_horizon}, J {args.candidates}, "
            f"K {args.top_candidates}, I {args.optimisation_iters}")
    return desc, {"update": lambda i: p.train_update(wm, opt_, batch, args, i, lambda: ""),
                  "planned action": lambda i: planner.act(o, i == 0, explore=True)}


def main():
    opt = parse("dmc", "dm_control/cheetah-run-v0")
    desc, ops = operations(opt.preset, opt.env_id, opt.bf16)
    times = cpu_seconds(ops["update"], opt.repeats + 2)
    plan = cpu_seconds(ops["planned action"], opt.repeats + 2)
    print(f"{desc}, threads {opt.threads}, bf16 {opt.bf16}")
    print(f"update: median {np.median(times[2:]):.3f} s CPU (runs: {', '.join(f'{x:.2f}' for x in times[2:])})")
    print(f"planned action: median {np.median(plan[2:]):.3f} s CPU "
          f"(runs: {', '.join(f'{x:.3f}' for x in plan[2:])}); peak RSS {peak_rss_gib():.2f} GiB")

if __name__ == "__main__":
    main()
