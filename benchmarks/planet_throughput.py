"""Seconds per PlaNet update and per planned action, measured on the real functions of algos/planet.py.

    python benchmarks/planet_throughput.py --preset dmc --env-id dm_control/cheetah-run-v0 --repeats 5 [--bf16]
    python benchmarks/planet_throughput.py --preset small --env-id dm_control/cartpole-swingup-v0

Process CPU time with torch.set_num_threads(1) (../shared/PERFORMANCE_TARGETS.md), median over `repeats`
after two warm-up repetitions, on random data shaped like the env's observations. An update is one
world-model gradient step on B×L (overshooting as the preset sets it, off by default). A planned action
is `Planner.act`: encode the frame, one filter step, and the whole CEM search. Peak resident memory is
the process's ru_maxrss.
"""

import argparse
import dataclasses
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import planet as p  # noqa: E402
from common.envs import make_env  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dmc")
    ap.add_argument("--env-id", default="dm_control/cheetah-run-v0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true")
    opt = ap.parse_args()
    torch.set_num_threads(opt.threads)
    args = dataclasses.replace(p.Args(), preset=opt.preset, env_id=opt.env_id, bf16=opt.bf16, **p.PRESETS[opt.preset])
    env = make_env(opt.env_id, 0, action_repeat=p.planet_action_repeat(opt.env_id))
    action_dim = env.action_space.shape[0]
    torch.manual_seed(0)
    wm = p.WorldModel(env.observation_space, action_dim, args)
    opt_ = torch.optim.Adam(wm.parameters(), args.model_lr, eps=args.adam_eps)
    B, T = args.batch_size, args.batch_length
    shape = env.observation_space.shape
    obs = torch.randint(0, 256, (B, T, *shape), dtype=torch.uint8) if wm.image else torch.randn(B, T, *shape)
    batch = dict(obs=obs, action=torch.rand(B, T, action_dim) * 2 - 1, reward=torch.randn(B, T),
                 terminated=torch.zeros(B, T, dtype=torch.bool), is_first=torch.rand(B, T) < 0.01)
    times = []
    for i in range(opt.repeats + 2):
        t = time.process_time()
        p.train_update(wm, opt_, batch, args, i, lambda: "")
        times.append(time.process_time() - t)
    planner = p.Planner(wm, action_dim, args, torch.device("cpu"))
    o, _ = env.reset(seed=0)
    plan = []
    for i in range(opt.repeats + 2):
        t = time.process_time()
        planner.act(o, i == 0, explore=True)
        plan.append(time.process_time() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = sum(x.numel() for x in wm.parameters())
    print(f"preset {opt.preset}, {opt.env_id} obs {shape}, {action_dim}-dim actions, batch {B}x{T}, deter {args.deter}, "
          f"stoch {args.stoch}, hidden {args.hidden}, CNN depth {args.cnn_depth}, {params / 1e6:.2f}M parameters, "
          f"threads {opt.threads}, bf16 {opt.bf16}")
    print(f"update: median {np.median(times[2:]):.3f} s CPU (runs: {', '.join(f'{x:.2f}' for x in times[2:])})")
    print(f"planned action (H {args.planning_horizon}, J {args.candidates}, K {args.top_candidates}, "
          f"I {args.optimisation_iters}): median {np.median(plan[2:]):.3f} s CPU "
          f"(runs: {', '.join(f'{x:.3f}' for x in plan[2:])}); peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
