"""Milliseconds per TD-MPC update and per planned action, measured on the real functions of algos/tdmpc.py.

    python benchmarks/tdmpc_throughput.py --preset dmc --env-id dm_control/cheetah-run-v0 --repeats 5 [--bf16]
    python benchmarks/tdmpc_throughput.py --preset small --env-id Pendulum-v1

Process CPU time with torch.set_num_threads(1) (../shared/PERFORMANCE_TARGETS.md), median over `repeats`
after two warm-up repetitions. An update is `tdmpc.update` (TOLD loss over an H-step window, policy step,
Polyak step) on a batch of random windows shaped like the env's data, plus drawing that batch from a
prioritized replay of 100,000 rows and writing back its priorities. A planned action is `Planner.act`
warm-started (not the first step of an episode) at the full horizon: encode, the policy's trajectories,
and every MPPI iteration. Peak resident memory is the process's ru_maxrss.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tdmpc as td  # noqa: E402
from benchmarks.timing import cpu_seconds, parse, peak_rss_gib  # noqa: E402
from common.replay import Replay  # noqa: E402


def operations(preset: str, env_id: str, bf16: bool, device="cpu", rows: int = 100_000) -> tuple[str, dict]:
    """The script's update (with its PER sampling), the sampling alone, and the warm-started planned action at `preset`
    on `device`, over a replay of `rows` random rows: (description, {name: fn(i)})."""
    args = dataclasses.replace(td.Args(), preset=preset, env_id=env_id, bf16=bf16, **td.PRESETS[preset])
    args.action_repeat = td.tdmpc_action_repeat(env_id)
    env = td.make_tdmpc_env(args, 0)
    space, action_dim = env.observation_space, env.action_space.shape[0]
    torch.manual_seed(0)
    model = td.TOLD(space, action_dim, args).to(device)
    target = td.TOLD(space, action_dim, args).requires_grad_(False).to(device)
    target.load_state_dict(model.state_dict())
    opt_, pi_opt = torch.optim.Adam(model.parameters(), args.lr), torch.optim.Adam(model.pi.parameters(), args.lr)

    # random data in episodes of 1,000 rows, as the planner would have filled the replay
    rng = np.random.default_rng(0)
    replay = Replay(rows, None, seed=0)
    windows = td.PrioritizedWindows(replay, args.horizon, args.per_alpha, args.per_beta)
    for i in range(rows):
        obs = rng.integers(0, 256, space.shape, np.uint8) if space.dtype == np.uint8 else rng.standard_normal(space.shape, np.float32)
        windows.add(obs=obs, action=rng.uniform(-1, 1, action_dim).astype(np.float32), reward=float(rng.standard_normal()),
                    terminated=False, truncated=i % 1000 == 999, is_first=i % 1000 == 0)

    def one_update(i):
        sampled, idx, weights = windows.sample(args.batch_size)
        batch = td.window_batch(sampled, device)
        priority, _ = td.update(model, target, opt_, pi_opt, batch, torch.as_tensor(weights, device=device), args, i,
                                lambda: "")
        windows.update(idx, priority)

    planner = td.Planner(model, action_dim, args, torch.device(device))
    o, _ = env.reset(seed=0)
    step = args.schedule_steps  # the full horizon and the final std floor
    params = sum(x.numel() for x in model.parameters())
    desc = (f"preset {preset}, {env_id} obs {space.shape}, {action_dim}-dim actions, batch {args.batch_size}, "
            f"H {args.horizon}, latent {args.latent_dim}, mlp {args.mlp_dim}, {params / 1e6:.2f}M parameters; planner "
            f"samples {args.num_samples}, elites {args.num_elites}, iterations {args.iterations}, H {planner.horizon(step)}")
    return desc, {"update": one_update, "PER sampling": lambda i: windows.sample(args.batch_size),
                  "planned action": lambda i: planner.act(o, i == 0, explore=True, step=step)}


def main():
    opt = parse("dmc", "dm_control/cheetah-run-v0")
    desc, ops = operations(opt.preset, opt.env_id, opt.bf16)
    times = cpu_seconds(ops["update"], opt.repeats + 2)
    sample = cpu_seconds(ops["PER sampling"], opt.repeats + 2)
    plan = cpu_seconds(ops["planned action"], opt.repeats + 3)
    print(f"{desc}, threads {opt.threads}, bf16 {opt.bf16}")
    print(f"update (incl. PER sampling over 100k rows): median {1000 * np.median(times[2:]):.0f} ms CPU "
          f"(runs: {', '.join(f'{1000 * x:.0f}' for x in times[2:])}); of which sampling {1000 * np.median(sample[2:]):.1f} ms")
    print(f"planned action, warm-started: median {1000 * np.median(plan[3:]):.0f} ms CPU "
          f"(runs: {', '.join(f'{1000 * x:.0f}' for x in plan[3:])}); peak RSS {peak_rss_gib():.2f} GiB")

if __name__ == "__main__":
    main()
