"""Throughput of World Models' parts, measured on the real functions of algos/world_models_carracing.py.

    python benchmarks/world_models_throughput.py --repeats 5 [--workers 2]

Process CPU time with torch.set_num_threads(1) (../shared/PERFORMANCE_TARGETS.md), median over `repeats` after
two warm-up repetitions:
  - V update: the script's vae_update (forward, loss, backward, Adam step) on 100 random 64x64 RGB frames;
  - M update: the script's mdn_update (z sampled from μ, log σ², loss, backward, value clipping, Adam step),
    batch 16 × 32;
  - controller step per frame, env excluded: the script's controller_act (V encodes the frame, C acts, M takes one LSTM step).
Wall-clock rates: the raw CarRacing-v3 env through make_env (random actions, one process), the parallel
collector (`_collect_rollout` in a pool of --workers processes, 200-step rollouts), and one 1,000-step
controller rollout (env + V + M + C) in this process, from which a CMA-ES generation at population 64 × 16
rollouts is computed as 1,024 rollouts / cores.
"""

import argparse
import dataclasses
import multiprocessing as mp
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import world_models_carracing as wm  # noqa: E402
from benchmarks.timing import cpu_seconds, peak_rss_gib  # noqa: E402
from common.envs import make_env  # noqa: E402
from common.run import keep_freed_memory  # noqa: E402


def operations(bf16: bool, device="cpu") -> tuple[str, dict]:
    """V's update, M's update and (on the CPU, where C acts) the controller's acting step on `device`, the paper's
    sizes, random data: (description, {name: fn(i)}, (args, V, M, C's parameters) for the rollouts in main)."""
    args = wm.Args(bf16=bf16)
    torch.manual_seed(0)
    vae = wm.VAE(args.z_size).to(device)
    rnn = wm.MDNRNN(args.z_size, 3, args.rnn_size, args.num_mixtures).to(device)
    vae_opt = torch.optim.Adam(vae.parameters(), args.vae_lr, fused=True)  # as the script builds them
    rnn_opt = torch.optim.Adam(rnn.parameters(), args.rnn_lr, fused=True)
    frames = torch.rand(100, 3, 64, 64, device=device)
    T = 33
    series = [dict(mu=np.random.randn(200, 32).astype(np.float32), logvar=np.full((200, 32), -2.0, np.float32),
                   action=np.random.uniform(-1, 1, (200, 3)).astype(np.float32), reward=np.zeros(200, np.float32),
                   terminated=np.zeros(200, bool)) for _ in range(4)]
    batch = {k: torch.as_tensor(v, device=device) for k, v in wm.mdn_batch(series, 16, T - 1, np.random.default_rng(0)).items()}
    params = np.random.default_rng(0).standard_normal(wm.controller_size(args.z_size, args.rnn_size)) * 0.1
    obs = np.random.randint(0, 256, (3, 64, 64), np.uint8)
    state = {"h": torch.zeros(1, args.rnn_size, device=device), "s": None}

    def controller_step(_):  # the script's acting step, env excluded
        _, state["h"], state["s"] = wm.controller_act(vae, rnn, params, obs, state["h"], state["s"])

    desc = f"V batch 100 (64x64x3, z {args.z_size}); M batch 16 x 32, LSTM {args.rnn_size}, {args.num_mixtures} mixtures"
    ops = {"V update": lambda i: wm.vae_update(vae, vae_opt, frames, args, lambda loss: None),
           "M update": lambda i: wm.mdn_update(rnn, rnn_opt, batch, args, lambda loss: None)}
    if torch.device(device).type == "cpu":  # C acts in the CPU rollout workers only
        ops["controller step"] = controller_step
    return desc, ops, (args, vae, rnn, params)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in the V and M updates (as --bf16 in the script)")
    opt = p.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the script does on a CPU
    _, ops, (args, vae, rnn, params) = operations(opt.bf16)
    vae_update, rnn_update, controller_step = ops.values()

    vae_t = cpu_seconds(vae_update, opt.repeats + 2)[2:]
    rnn_t = cpu_seconds(rnn_update, opt.repeats * 10 + 2)[2:]
    ctl_t = [sum(cpu_seconds(controller_step, 100)) / 100 for _ in range(opt.repeats + 2)][2:]
    print(f"bf16 {opt.bf16}")
    print(f"V update, batch 100 (64x64x3, z 32): median {1000 * np.median(vae_t):.0f} ms CPU "
          f"(runs: {', '.join(f'{1000 * x:.0f}' for x in vae_t)})")
    print(f"M update, batch 16 x 32, LSTM 256, 5 mixtures: median {1000 * np.median(rnn_t):.2f} ms CPU")
    print(f"controller step per frame (V encode + C + LSTM step), env excluded: median {1000 * np.median(ctl_t):.2f} ms CPU")

    env = make_env(args.env_id, 0)
    env.reset(seed=0)
    t0, n = time.perf_counter(), 300
    for _ in range(n):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    raw = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    ret = wm.run_controller(env, vae.eval(), rnn.eval(), params, 0, 1000)
    rollout_s = time.perf_counter() - t0
    print(f"raw CarRacing-v3 via make_env, one process: {raw:.0f} steps/s; one 1,000-step controller rollout "
          f"(return {ret:.0f}): {rollout_s:.1f} s wall")

    small = dataclasses.replace(args, max_episode_steps=200)
    with tempfile.TemporaryDirectory() as d:
        tasks = [(k, d) for k in range(4 * opt.workers)]
        with mp.get_context("spawn").Pool(opt.workers, wm._init_worker, (vars(small),)) as pool:
            pool.map(wm._collect_rollout, tasks[: opt.workers])  # warm-up: workers built
            t0 = time.perf_counter()
            pool.map(wm._collect_rollout, tasks)
            wall = time.perf_counter() - t0
    rate = len(tasks) / wall
    print(f"collector, {opt.workers} workers: {rate:.2f} rollouts/s of 200 steps = {200 * rate:.0f} env steps/s "
          f"({200 * rate / raw:.2f}x the one-process raw env)")
    cores = os.cpu_count()
    print(f"CMA-ES generation at population 64 x 16 rollouts of 1,000 steps: 1,024 x {rollout_s:.1f} s / {cores} cores "
          f"= {1024 * rollout_s / cores / 60:.0f} min on this machine ({1024 * rollout_s / 60:.0f} core-minutes); "
          f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
