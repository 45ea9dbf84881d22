"""DINO-WM costs on the real functions of algos/dino_wm.py: encoder and predictor per batch, one training step,
one CEM iteration of the planner.

    python benchmarks/dino_wm_throughput.py --preset paper --repeats 1 [--bf16]
    python benchmarks/dino_wm_throughput.py --preset small --repeats 3

Process CPU time with torch.set_num_threads(1) (../shared/PERFORMANCE_TARGETS.md), median over `repeats` after
one warm-up call, random frames and weights (the costs do not depend on the values). The training step is the
script's: encode num_hist + 1 frames per sequence with the frozen encoder, prediction loss, AdamW step
(decoder off). One CEM iteration = `samples` action sequences rolled out `horizon` steps from one encoded start
frame (the start and goal are encoded once per replan, outside the iteration) and scored against the goal.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dino_wm as D  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.timing import cpu_seconds, parse, peak_rss_gib  # noqa: E402


def operations(preset: str, env_id: str, bf16: bool, device="cpu") -> tuple[str, dict]:
    """The script's encoder and predictor passes, training step and one CEM iteration at `preset` on `device`, random
    frames and weights: (description, {name: fn(i)})."""
    args = dataclasses.replace(D.Args(), preset=preset, env_id=env_id, **D.PRESETS[preset])
    proprio_dim, action_dim = 4, 2
    torch.manual_seed(0)
    patches = (args.image_size // 14) ** 2
    wm = D.WorldModel(D.DinoV2(), proprio_dim, action_dim, patches, args).to(device)
    optim = torch.optim.AdamW(p for n, p in wm.named_parameters() if not n.startswith("encoder."))
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    frames_needed = args.num_hist + 1
    a_dim = action_dim * args.frameskip
    train_batch = 8 if preset == "paper" else args.batch_size

    def frames(n):
        return torch.randint(0, 256, (n, 3, args.frame_size, args.frame_size), dtype=torch.uint8, device=device)

    def encoder_batch(_):
        wm.eval()
        with torch.no_grad(), autocast:
            wm.encode_frames(frames(args.batch_size))

    def train_step(_):
        wm.train()
        b = train_batch
        with autocast:
            feats = wm.encode_frames(frames(b * frames_needed)).view(b, frames_needed, patches, -1)
            z = wm.latent(feats, torch.randn(b, frames_needed, proprio_dim, device=device),
                          torch.randn(b, frames_needed, a_dim, device=device))
            loss, _ = D.prediction_loss(wm, z)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    def predictor_batch(_):
        wm.eval()
        z = torch.randn(args.batch_size, args.num_hist, patches, wm.predictor.pos_embedding.shape[-1], device=device)
        with torch.no_grad(), autocast:
            wm.predictor(z)

    wm.eval()
    with torch.no_grad(), autocast:
        z0, z_goal = (wm.latent(wm.encode_frames(frames(1))[:, None], torch.randn(1, 1, proprio_dim, device=device),
                                torch.zeros(1, 1, a_dim, device=device)) for _ in range(2))
        z_goal = z_goal[:, 0]

    def cem_iteration(_):
        wm.eval()
        with torch.no_grad(), autocast:
            acts = torch.randn(args.samples, args.horizon, a_dim, device=device)
            cost = D.planning_cost(wm, D.rollout(wm, z0.expand(args.samples, -1, -1, -1), acts)[:, -1], z_goal, args.alpha)
            torch.topk(cost, args.elites, largest=False)

    params = sum(p.numel() for p in wm.predictor.parameters()) / 1e6
    desc = (f"preset {preset}: frames {args.frame_size} px -> {args.image_size} px, {patches} patches of 384; predictor "
            f"{args.depth} blocks × {args.heads} heads × {args.dim_head}, MLP {args.mlp_dim}, {params:.1f}M parameters, "
            f"history {args.num_hist}")
    return desc, {f"encoder, batch of {args.batch_size} frames": encoder_batch,
                  f"predictor forward, batch of {args.batch_size} × {args.num_hist} frames": predictor_batch,
                  f"training step, batch {train_batch}": train_step,
                  f"CEM iteration ({args.samples} samples, horizon {args.horizon})": cem_iteration}


def main():
    opt = parse("small", "PointMaze_UMaze-v3")
    desc, ops = operations(opt.preset, opt.env_id, opt.bf16)
    results = {}
    for name, fn in ops.items():
        warm = 0 if opt.preset == "paper" and name.startswith("CEM") else 1  # a paper-size iteration takes minutes
        results[name] = cpu_seconds(fn, opt.repeats + warm)[warm:]
    print(f"{desc}; threads {opt.threads}, bf16 {opt.bf16}")
    for name, ts in results.items():
        print(f"{name}: median {np.median(ts):.3f} s CPU (runs: {', '.join(f'{x:.3f}' for x in ts)})")
    print(f"peak RSS {peak_rss_gib():.2f} GiB")

if __name__ == "__main__":
    main()
