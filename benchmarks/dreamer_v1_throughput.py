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


def operations(preset: str, env_id: str, bf16: bool, device="cpu") -> tuple[str, dict]:
    """The script's update and acting step at `preset` on `device`, on random data: (description, {name: fn(i)})."""
    args = dataclasses.replace(d.Args(), preset=preset, env_id=env_id, bf16=bf16, **d.PRESETS[preset])
    env = make_env(env_id, 0)
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    torch.manual_seed(0)
    wm = d.WorldModel(env.observation_space, action_dim, args).to(device)
    actor = d.Actor(wm.feat_dim, action_dim, discrete, args.units, args.action_init_std, args.action_mean_scale).to(device)
    value = d.mlp(wm.feat_dim, 1, 3, args.units).to(device)
    opts = (torch.optim.Adam(wm.parameters(), args.model_lr, eps=args.adam_eps),
            torch.optim.Adam(actor.parameters(), args.actor_lr, eps=args.adam_eps),
            torch.optim.Adam(value.parameters(), args.value_lr, eps=args.adam_eps))
    B, T = args.batch_size, args.batch_length
    batch = {k: v.to(device) for k, v in random_batch(env.observation_space, action_dim, discrete, B, T).items()}
    agent = d.Agent(wm, actor, action_dim, torch.device(device))
    o, _ = env.reset(seed=0)
    params = sum(x.numel() for m in (wm, actor, value) for x in m.parameters())
    desc = (f"preset {preset}, {env_id} obs {env.observation_space.shape}, {action_dim} "
            f"{'discrete' if discrete else 'continuous'} actions, batch {B}x{T}, deter {args.deter}, stoch {args.stoch}, "
            f"units {args.units}, CNN depth {args.cnn_depth}, horizon {args.horizon}, {params / 1e6:.2f}M parameters")
    return desc, {"update": lambda i: d.train_update(wm, actor, value, opts, batch, args, i, lambda: ""),
                  "act": lambda i: agent.act(o, i == 0, greedy=False, expl_amount=args.expl_amount)}


def main():
    opt = parse("dmc", "dm_control/cheetah-run-v0")
    desc, ops = operations(opt.preset, opt.env_id, opt.bf16)
    times = cpu_seconds(ops["update"], opt.repeats + 2)
    act = cpu_seconds(ops["act"], 50)
    print(f"{desc}, threads {opt.threads}, bf16 {opt.bf16}")
    print(f"update: median {np.median(times[2:]):.3f} s CPU (runs: {', '.join(f'{x:.2f}' for x in times[2:])})")
    print(f"act: median {1000 * np.median(act[5:]):.2f} ms CPU per agent step; peak RSS {peak_rss_gib():.2f} GiB")

if __name__ == "__main__":
    main()
