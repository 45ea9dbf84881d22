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


def main():
    opt = parse("small", "MinAtar/Breakout-v1")
    args = dataclasses.replace(I.Args(), preset=opt.preset, env_id=opt.env_id, bf16=opt.bf16, **I.PRESETS[opt.preset])
    env = make_env(opt.env_id, 0, pixels=True, size=args.resolution)
    c, h, w = env.observation_space.shape
    n_act = env.action_space.n
    torch.manual_seed(0)
    tok = I.Tokenizer(c, args)
    wm = I.WorldModel(tok.tokens_per_frame, n_act, args)
    ac = I.ActorCritic(c, args.resolution, n_act)
    opts = dict(tok=torch.optim.Adam(tok.parameters(), 1e-4), wm=I.world_model_optimizer(wm, args),
                ac=torch.optim.Adam(ac.parameters(), 1e-4))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=opt.bf16)

    def batch(b, length):
        return I.to_batch(dict(obs=np.random.randint(0, 256, (b, length, c, h, w), dtype=np.uint8),
                               action=np.random.randint(0, n_act, (b, length)), reward=np.random.randn(b, length),
                               end=np.zeros((b, length), bool), mask=np.ones((b, length), bool)), args.resolution, "cpu")

    def tokenizer_update(_):
        I.tokenizer_update(tok, opts["tok"], batch(args.tokenizer_batch, 1)["frames"][:, 0], args.grad_clip, autocast)

    def world_model_update(_):
        b = batch(args.world_model_batch, args.max_blocks)
        with autocast:
            loss, _ = I.world_model_loss(tok, wm, b)
        I.optimizer_step(opts["wm"], loss, wm, args.grad_clip)

    def actor_critic_update(_):
        b = batch(args.actor_critic_batch, args.burn_in + 1)
        with autocast:
            traj = I.imagine(tok, wm, ac, b, args.horizon)
            loss, _ = I.actor_critic_loss(traj, args.gamma, args.lambda_, args.entropy_weight)
        I.optimizer_step(opts["ac"], loss, ac, args.grad_clip)

    def imagined_fps(use_cache: bool, steps: int) -> float:
        env_ = I.DreamEnv(tok, wm, use_cache=use_cache)
        frames = batch(args.actor_critic_batch, 1)["frames"][:, 0]
        with autocast:
            env_.reset(frames)
            t = time.process_time()
            for _ in range(steps):
                env_.step(torch.randint(0, n_act, (args.actor_critic_batch,)))
        return args.actor_critic_batch * steps / (time.process_time() - t)

    tok.train(), wm.train(), ac.train()
    results = {}
    for name, fn in (("tokenizer", tokenizer_update), ("world model", world_model_update)):
        results[name] = cpu_seconds(fn, opt.repeats + opt.warmup)[opt.warmup:]
    tok.eval(), wm.eval()  # as in training: the actor-critic imagines with the other two in eval mode
    results["actor-critic"] = cpu_seconds(actor_critic_update, opt.repeats + opt.warmup)[opt.warmup:]
    with torch.no_grad():
        fps_cache = [imagined_fps(True, args.horizon - 1) for _ in range(opt.repeats)]
        fps_plain = [imagined_fps(False, 3) for _ in range(max(1, opt.repeats // 2))]
    params = {k: sum(x.numel() for x in v.parameters()) / 1e6 for k, v in dict(tokenizer=tok, world_model=wm, actor_critic=ac).items()}
    print(f"preset {opt.preset}, {opt.env_id} obs {(c, h, w)} -> {args.resolution}², {tok.tokens_per_frame} tokens/frame, "
          f"vocab {args.vocab_size}; transformer {args.layers}×{args.embed} ({args.heads} heads), context {args.max_blocks} "
          f"steps; batches {args.tokenizer_batch} / {args.world_model_batch}×{args.max_blocks} / {args.actor_critic_batch}, "
          f"burn-in {args.burn_in}, horizon {args.horizon}; parameters (M): "
          + ", ".join(f"{k} {v:.2f}" for k, v in params.items()) + f"; threads {opt.threads}, bf16 {opt.bf16}")
    for name, ts in results.items():
        print(f"{name} update: median {np.median(ts):.2f} s CPU (runs: {', '.join(f'{x:.2f}' for x in ts)})")
    print(f"imagined frames/s (batch {args.actor_critic_batch}, decoded): KV cache {np.median(fps_cache):.1f}, "
          f"without {np.median(fps_plain):.1f} (first 3 steps only; the gap grows with the context); "
          f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
