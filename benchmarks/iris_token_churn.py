"""Do an IRIS tokenizer's tokens stay put while it trains? Offline, on MinAtar/Breakout-v1 frames of random play.

    python benchmarks/iris_token_churn.py --tokenizer-learning-rate 1e-3 [--codebook-restart] [--world-model]

A fresh tokenizer of the small preset (at --resolution 12, as in the learning checks) trains in phases of 100
updates (one epoch of the learning check). After each phase: the share of tokens of 1,024 fixed frames that differ
from the previous phase's, the codes in use, and the share of paddle and ball pixels the reconstruction misses.
The world model learns on these tokens, so a changed token is a word it has to learn again. With --world-model a
fresh world model trains alongside, 120 updates after each phase from the second on (the learning check's
schedule), and its termination head is probed as in iris_breakout_probe.py (P(end) on held-out random play where
the episode ended, where the paddle returned the ball, and elsewhere).
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import iris as I  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from iris_breakout_probe import BALL, PADDLE, termination_probe  # noqa: E402

from common.envs import make_env  # noqa: E402
from common.replay import Replay  # noqa: E402


def random_play(env, rows: int, seed: int) -> Replay:
    replay, rng = Replay(rows + 200, None, seed=seed), np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    replay.add(obs=obs, action=np.int64(0), reward=0.0, terminated=False, truncated=False, is_first=True)
    while replay.size < rows:
        action = int(rng.integers(env.action_space.n))
        obs, reward, terminated, truncated, _ = env.step(action)
        replay.add(obs=obs, action=np.int64(action), reward=reward, terminated=terminated, truncated=truncated, is_first=False)
        if terminated or truncated:
            obs, _ = env.reset()
            replay.add(obs=obs, action=np.int64(0), reward=0.0, terminated=False, truncated=False, is_first=True)
    return replay


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer-learning-rate", type=float, default=1e-3)
    parser.add_argument("--codebook-restart", action="store_true")
    parser.add_argument("--world-model", action="store_true")
    parser.add_argument("--phases", type=int, default=20)
    parser.add_argument("--rows", type=int, default=8_000)
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(cli.seed)
    args = dataclasses.replace(I.Args(), **{**I.PRESETS["small"], "resolution": 12, "dropout": 0.0})
    env = make_env("MinAtar/Breakout-v1", cli.seed, pixels=True)
    replay = random_play(env, cli.rows, cli.seed)
    spans = I.episode_spans(replay)

    def frames(n):
        return I.to_batch(I.sample_segments(replay, spans, n, 1, True), args.resolution, "cpu")["frames"][:, 0]

    tok = I.Tokenizer(env.observation_space.shape[0], args)
    opt = torch.optim.Adam(tok.parameters(), cli.tokenizer_learning_rate)
    wm = I.WorldModel(tok.tokens_per_frame, env.action_space.n, args)
    wm_opt = I.world_model_optimizer(wm, args)
    no_autocast = torch.autocast("cpu", enabled=False)
    fixed, before = frames(1024), None
    on = fixed[..., :10, :10] > 0.5
    print(f"{replay.size} rows of random play, {len(spans)} episodes; tokenizer lr {cli.tokenizer_learning_rate}, "
          f"codebook restart {cli.codebook_restart}")
    for phase in range(1, cli.phases + 1):
        tok.train()
        for _ in range(100):
            batch = frames(args.tokenizer_batch)
            I.tokenizer_update(tok, opt, batch, args.grad_clip, no_autocast)
            if cli.codebook_restart:
                I.restart_dead_codes(tok, batch)
        tok.eval()
        with torch.no_grad():
            tokens = tok.encode(fixed)[2]
            decoded = tok.decode_tokens(tokens)[..., :10, :10] > 0.5
        missed = [float((on[:, c] & ~decoded[:, c]).sum() / on[:, c].sum()) for c in (PADDLE, BALL)]
        changed = "-" if before is None else f"{(tokens != before).float().mean():.3f}"
        line = (f"phase {phase:2d}: tokens changed {changed}, codes used {tokens.unique().numel()}, "
                f"missed paddle {missed[0]:.3f} ball {missed[1]:.3f}")
        before = tokens
        if cli.world_model and phase > 1:
            wm.train()
            for _ in range(120):
                batch = I.to_batch(I.sample_segments(replay, spans, args.world_model_batch, args.max_blocks, True),
                                   args.resolution, "cpu")
                loss, metrics = I.world_model_loss(tok, wm, batch)
                I.optimizer_step(wm_opt, loss, wm, args.grad_clip)
            wm.eval()
            p_end = termination_probe(tok, wm, args, env, 150, np.random.default_rng(7))
            line += "; world model P(end): " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in p_end.items())
        print(line, flush=True)


if __name__ == "__main__":
    main()
