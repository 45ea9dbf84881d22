"""Seconds per Dreamer (v1) update and milliseconds per acting step, measured on the real functions of
algos/dreamer_v1.py.

    python benchmarks/dreamer_v1_throughput.py --preset dmc --env-id dm_control/cheetah-run-v0 --repeats 5 [--bf16]
    python benchmarks/dreamer_v1_throughput.py --preset small --env-id Pendulum-v1

Process CPU time per update (world model on B×L + 15-step imagination from all B×L posteriors with
gradients through the dynamics + action model + value model) with torch.set_num_threads(1)
(../shared/PERFORMANCE_TARGETS.md), median over `repeats` after two warm-up updates, on random data
shaped like the env's observations. Peak resident memory is the process's ru_maxrss. Acting: CPU time
of one `Agent.act` (encode + filter step + action model).
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dreamer_v1 as d  # noqa: E402
from benchmarks.timing import cpu_seconds, parse, peak_rss_gib, random_batch  # noqa: E402
from common.envs import make_env  # noqa: E402


def main():
    opt = parse("dmc", "dm_control/cheetah-run-v0")
    args = dataclasses.replace(d.Args(), preset=opt.preset, env_id=opt.env_id, bf16=opt.bf16, **d.PRESETS[opt.preset])
    env = make_env(opt.env_id, 0)
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    torch.manual_seed(0)
    wm = d.WorldModel(env.observation_space, action_dim, args)
    actor = d.Actor(wm.feat_dim, action_dim, discrete, args.units, args.action_init_std, args.action_mean_scale)
    value = d.mlp(wm.feat_dim, 1, 3, args.units)
    opts = (torch.optim.Adam(wm.parameters(), args.model_lr, eps=args.adam_eps),
            torch.optim.Adam(actor.parameters(), args.actor_lr, eps=args.adam_eps),
            torch.optim.Adam(value.parameters(), args.value_lr, eps=args.adam_eps))
    B, T = args.batch_size, args.batch_length
    shape = env.observation_space.shape
    batch = random_batch(env.observation_space, action_dim, discrete, B, T)
    times = cpu_seconds(lambda i: d.train_update(wm, actor, value, opts, batch, args, i, lambda: ""), opt.repeats + 2)
    agent = d.Agent(wm, actor, action_dim, torch.device("cpu"))
    o, _ = env.reset(seed=0)
    act = cpu_seconds(lambda i: agent.act(o, i == 0, greedy=False, expl_amount=args.expl_amount), 50)
    rss = peak_rss_gib()
    params = sum(x.numel() for m in (wm, actor, value) for x in m.parameters())
    print(f"preset {opt.preset}, {opt.env_id} obs {shape}, {action_dim} {'discrete' if discrete else 'continuous'} "
          f"actions, batch {B}x{T}, deter {args.deter}, stoch {args.stoch}, units {args.units}, CNN depth "
          f"{args.cnn_depth}, horizon {args.horizon}, {params / 1e6:.2f}M parameters, threads {opt.threads}, bf16 {opt.bf16}")
    print(f"update: median {np.median(times[2:]):.3f} s CPU (runs: {', '.join(f'{x:.2f}' for x in times[2:])})")
    print(f"act: median {1000 * np.median(act[5:]):.2f} ms CPU per agent step; peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
