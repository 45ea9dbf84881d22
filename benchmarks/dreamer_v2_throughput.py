"""Milliseconds per DreamerV2 update and per acting step, measured on the real functions of algos/dreamer_v2.py.

    python benchmarks/dreamer_v2_throughput.py --preset atari --repeats 5
    python benchmarks/dreamer_v2_throughput.py --preset small --env-id MinAtar/Breakout-v1

Process CPU time per update (world model + 15-step imagination from all B×T posteriors + actor + critic)
with torch.set_num_threads(1) (../shared/PERFORMANCE_TARGETS.md), median over `repeats` after two
warm-up updates, on random data shaped like the env's observations. Peak resident memory is the
process's ru_maxrss. Acting: CPU time of one `Agent.act` (encode + filter step + policy).
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dreamer_v2 as d  # noqa: E402
from benchmarks.timing import cpu_seconds, parse, peak_rss_gib, random_batch  # noqa: E402
from common.envs import make_env  # noqa: E402


def operations(preset: str, env_id: str, bf16: bool, device="cpu") -> tuple[str, dict]:
    """The script's update and acting step at `preset` on `device`, on random data: (description, {name: fn(i)})."""
    args = dataclasses.replace(d.Args(), preset=preset, env_id=env_id, bf16=bf16, **d.PRESETS[preset])
    env = make_env(env_id, 0, grayscale=args.grayscale and env_id.startswith("ALE/"))
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    torch.manual_seed(0)
    wm = d.WorldModel(env.observation_space, action_dim, args).to(device)
    actor = d.Actor(wm.feat_dim, action_dim, discrete, args.mlp_layers, args.mlp_units).to(device)
    critic = d.mlp(wm.feat_dim, 1, args.mlp_layers, args.mlp_units).to(device)
    target = d.mlp(wm.feat_dim, 1, args.mlp_layers, args.mlp_units).to(device)
    opts = (torch.optim.Adam(wm.parameters(), args.model_lr, eps=args.adam_eps),
            torch.optim.Adam(actor.parameters(), args.actor_lr, eps=args.adam_eps),
            torch.optim.Adam(critic.parameters(), args.critic_lr, eps=args.adam_eps))
    B, T = args.batch_size, args.batch_length
    batch = {k: v.to(device) for k, v in random_batch(env.observation_space, action_dim, discrete, B, T).items()}
    agent = d.Agent(wm, actor, action_dim, torch.device(device))
    o, _ = env.reset(seed=0)
    params = sum(p.numel() for m in (wm, actor, critic) for p in m.parameters())
    desc = (f"preset {preset}, {env_id} obs {env.observation_space.shape}, {action_dim} actions, batch {B}x{T}, deter "
            f"{args.deter}, {args.stoch}x{args.classes} latents, {params / 1e6:.1f}M parameters")
    return desc, {"update": lambda i: d.train_update(wm, actor, critic, target, opts, batch, args, discrete, i, lambda: ""),
                  "act": lambda i: agent.act(o, i == 0, greedy=False)}


def main():
    opt = parse("atari", "ALE/Pong-v5")
    desc, ops = operations(opt.preset, opt.env_id, opt.bf16)
    times = cpu_seconds(ops["update"], opt.repeats + 2)
    act = cpu_seconds(ops["act"], 50)
    print(f"{desc}, threads {opt.threads}, bf16 {opt.bf16}")
    print(f"update: median {np.median(times[2:]):.3f} s CPU (runs: {', '.join(f'{x:.2f}' for x in times[2:])})")
    print(f"act: median {1000 * np.median(act[5:]):.2f} ms CPU per agent step; peak RSS {peak_rss_gib():.2f} GiB")

if __name__ == "__main__":
    main()
