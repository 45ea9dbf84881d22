"""Seconds per IRIS update of each component, and imagined frames per second with and without the KV cache,
measured on the real functions of algos/iris.py.

    python benchmarks/iris_throughput.py --preset atari --env-id ALE/Pong-v5 --repeats 3 --warmup 1 [--bf16]
    python benchmarks/iris_throughput.py --preset small --env-id MinAtar/Breakout-v1

Process CPU time with torch.set_num_threads(1) (../shared/PERFORMANCE_TARGETS.md), median over `repeats`
after `warmup` calls, on random uint8 frames shaped like the env's. One update = loss, backward, clip, Adam
step: the tokenizer on `tokenizer_batch` frames (L1 + codebook + commitment, no perceptual loss; `tokenizer_update`,
in micro-batches of CHUNK frames); the world
model on `world_model_batch` × `max_blocks` steps, including the no-grad tokenizer encode; the actor-critic on
`actor_critic_batch` trajectories (burn-in of `burn_in` reconstructed frames, `horizon` imagined steps, each
K + 1 transformer passes and one decode). Imagination speed: frames per second of `DreamEnv.step` at the
actor-critic batch, no gradient, decoded, with the KV cache and (over fewer steps) recomputing the sequence.
"""

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import iris as I  # noqa: E402
import torch  # noqa: E402

from benchmarks.timing import cpu_seconds, parse, peak_rss_gib  # noqa: E402
from common.envs import make_env  # noqa: E402


def operations(preset: str, env_id: str, bf16: bool, device="cpu") -> tuple[str, dict]:
    """The script's three component updates at `preset` on `device`, on random frames, and imagined frames per second
    (with and without the KV cache): (description, {name: fn(i)}, imagined_fps(use_cache, steps)). Each update puts
    the modules in the modes training uses: the actor-critic imagines with the tokenizer and world model in eval."""
    args = dataclasses.replace(I.Args(), preset=preset, env_id=env_id, bf16=bf16, **I.PRESETS[preset])
    env = make_env(env_id, 0, pixels=True, size=args.resolution)
    c, h, w = env.observation_space.shape
    n_act = env.action_space.n
    torch.manual_seed(0)
    tok = I.Tokenizer(c, args).to(device)
    wm = I.WorldModel(tok.tokens_per_frame, n_act, args).to(device)
    ac = I.ActorCritic(c, args.resolution, n_act).to(device)
    opts = dict(tok=torch.optim.Adam(tok.parameters(), 1e-4), wm=I.world_model_optimizer(wm, args),
                ac=torch.optim.Adam(ac.parameters(), 1e-4))
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

    def batch(b, length):
        return I.to_batch(dict(obs=np.random.randint(0, 256, (b, length, c, h, w), dtype=np.uint8),
                               action=np.random.randint(0, n_act, (b, length)), reward=np.random.randn(b, length),
                               end=np.zeros((b, length), bool), mask=np.ones((b, length), bool)), args.resolution, device)

    def tokenizer_update(_):
        tok.train()
        I.tokenizer_update(tok, opts["tok"], batch(args.tokenizer_batch, 1)["frames"][:, 0], args.grad_clip, autocast)

    def world_model_update(_):
        tok.train(), wm.train()
        b = batch(args.world_model_batch, args.max_blocks)
        with autocast:
            loss, _ = I.world_model_loss(tok, wm, b)
        I.optimizer_step(opts["wm"], loss, wm, args.grad_clip)

    def actor_critic_update(_):
        tok.eval(), wm.eval(), ac.train()
        b = batch(args.actor_critic_batch, args.burn_in + 1)
        with autocast:
            traj = I.imagine(tok, wm, ac, b, args.horizon)
            loss, _ = I.actor_critic_loss(traj, args.gamma, args.lambda_, args.entropy_weight)
        I.optimizer_step(opts["ac"], loss, ac, args.grad_clip)

    @torch.no_grad()
    def imagined_fps(use_cache: bool, steps: int) -> float:
        tok.eval(), wm.eval()
        env_ = I.DreamEnv(tok, wm, use_cache=use_cache)
        frames = batch(args.actor_critic_batch, 1)["frames"][:, 0]
        with autocast:
            env_.reset(frames)
            t = time.process_time()
            for _ in range(steps):
                env_.step(torch.randint(0, n_act, (args.actor_critic_batch,), device=device))
        return args.actor_critic_batch * steps / (time.process_time() - t)

    params = {k: sum(x.numel() for x in v.parameters()) / 1e6 for k, v in dict(tokenizer=tok, world_model=wm, actor_critic=ac).items()}
    desc = (f"preset {preset}, {env_id} obs {(c, h, w)} -> {args.resolution}², {tok.tokens_per_frame} tokens/frame, "
            f"vocab {args.vocab_size}; transformer {args.layers}×{args.embed} ({args.heads} heads), context {args.max_blocks} "
            f"steps; batches {args.tokenizer_batch} / {args.world_model_batch}×{args.max_blocks} / {args.actor_critic_batch}, "
            f"burn-in {args.burn_in}, horizon {args.horizon}; parameters (M): " + ", ".join(f"{k} {v:.2f}" for k, v in params.items()))
    ops = {"tokenizer update": tokenizer_update, "world model update": world_model_update,
           "actor-critic update": actor_critic_update}
    return desc, ops, (imagined_fps, args)


def main():
    opt = parse("small", "MinAtar/Breakout-v1")
    desc, ops, (imagined_fps, args) = operations(opt.preset, opt.env_id, opt.bf16)
    results = {name: cpu_seconds(fn, opt.repeats + opt.warmup)[opt.warmup:] for name, fn in ops.items()}
    fps_cache = [imagined_fps(True, args.horizon - 1) for _ in range(opt.repeats)]
    fps_plain = [imagined_fps(False, 3) for _ in range(max(1, opt.repeats // 2))]
    print(f"{desc}; threads {opt.threads}, bf16 {opt.bf16}")
    for name, ts in results.items():
        print(f"{name}: median {np.median(ts):.2f} s CPU (runs: {', '.join(f'{x:.2f}' for x in ts)})")
    print(f"imagined frames/s (batch {args.actor_critic_batch}, decoded): KV cache {np.median(fps_cache):.1f}, "
          f"without {np.median(fps_plain):.1f} (first 3 steps only; the gap grows with the context); "
          f"peak RSS {peak_rss_gib():.2f} GiB")

if __name__ == "__main__":
    main()
