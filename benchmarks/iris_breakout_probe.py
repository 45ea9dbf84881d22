"""Can an IRIS run's world model tell good Breakout play from bad? Two probes on a MinAtar/Breakout-v1 checkpoint.

    python benchmarks/iris_breakout_probe.py benchmarks/runs/<MinAtar Breakout run> [--episodes 60]

1. Teacher-forced termination: fresh episodes of uniformly random play are fed to the world model with their
   real frames and actions; the mean P(end) its termination head gives (at the action token, as in training)
   on the steps that ended the episode, on the steps where the paddle returned the ball (the ball on row 8
   before and after the step), and on all other steps. A world model that cannot tell a miss from a return
   gives both nearly the same P(end): then no action changes how long an imagined episode lasts.
2. Counterfactual returns: the same start states (random play for 0-11 steps), continued for 15 steps by fixed
   policies, once in the real game (a copy of the env) and once in imagination (4 samples each). A ball-tracking
   policy lasts far longer than random play in the real game; imagination that ranks the policies the same
   way is what the actor-critic needs to learn.
"""

import argparse
import copy
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import iris as I  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.envs import make_env  # noqa: E402

PADDLE, BALL = 0, 1  # MinAtar Breakout's channels: paddle, ball, trail, brick; actions: noop, left, right


def tracker(frames):
    """Move the paddle towards the ball's column (frames (B, C, H, W) in [0, 1])."""
    cols = torch.arange(frames.shape[-1], dtype=frames.dtype)
    paddle = (frames[:, PADDLE].sum(1) * cols).sum(1) / frames[:, PADDLE].sum((1, 2)).clamp(min=1e-6)
    ball = (frames[:, BALL].sum(1) * cols).sum(1) / frames[:, BALL].sum((1, 2)).clamp(min=1e-6)
    return torch.where(ball < paddle - 0.5, 1, torch.where(ball > paddle + 0.5, 2, 0))


def policy(name, frames, rng):
    if name == "tracker":
        return tracker(frames)
    if name == "random":
        return torch.as_tensor(rng.integers(0, 3, frames.shape[0]))
    return torch.full((frames.shape[0],), ("noop", "left", "right").index(name))


def ball_row(obs):
    rows = np.flatnonzero(obs[BALL].any(1))
    return rows[0] if len(rows) else -1


@torch.no_grad()
def termination_probe(tok, wm, args, env, episodes, rng):
    p_end = dict(end=[], returned=[], other=[])
    for ep in range(episodes):
        obs, _ = env.reset(seed=20_000 + ep)
        frames, actions, kinds = [obs], [], []
        for _ in range(wm.max_tokens // wm.block - 1):
            action = int(rng.integers(3))
            before = ball_row(obs)
            obs, _, terminated, truncated, _ = env.step(action)
            frames.append(obs)
            actions.append(action)
            kinds.append("end" if terminated else "returned" if before == ball_row(obs) == 8 else "other")
            if terminated or truncated:
                break
        x = I.to_frames(torch.as_tensor(np.stack(frames[:len(actions)])), args.resolution)[None]
        tokens = tok.encode(x)[2]
        _, _, logits_end = wm(torch.cat([tokens, torch.tensor(actions)[None, :, None]], 2).flatten(1))
        for kind, p in zip(kinds, torch.softmax(logits_end[0].float(), -1)[:, 1].tolist()):
            p_end[kind].append(p)
    return p_end


@torch.no_grad()
def counterfactual_probe(tok, wm, args, env, starts, rng, horizon=15, samples=4):
    games, frames = [], []
    while len(games) < starts:
        obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
        alive = True
        for _ in range(int(rng.integers(0, 12))):
            obs, _, terminated, truncated, _ = env.step(int(rng.integers(3)))
            alive = not (terminated or truncated)
            if not alive:
                break
        if alive:
            games.append(copy.deepcopy(env))
            frames.append(obs)
    start = I.to_frames(torch.as_tensor(np.stack(frames)), args.resolution)
    rows = []
    for name in ("tracker", "random", "noop", "left", "right"):
        real_return, real_len = [], []
        for game, obs in zip(games, frames):
            game, total, steps = copy.deepcopy(game), 0.0, horizon
            for t in range(horizon):
                action = int(policy(name, I.to_frames(torch.as_tensor(obs[None]), args.resolution), rng)[0])
                obs, reward, terminated, _, _ = game.step(action)
                total += reward
                if terminated:
                    steps = t + 1
                    break
            real_return.append(total)
            real_len.append(steps)
        dream_return, dream_len = torch.zeros(starts), torch.zeros(starts)
        for _ in range(samples):
            dream = I.DreamEnv(tok, wm)
            obs = dream.reset(start)
            alive, steps = torch.ones(starts, dtype=torch.bool), torch.full((starts,), float(horizon))
            for t in range(horizon):
                obs, reward, end = dream.step(policy(name, obs, rng), predict_next=t < horizon - 1)
                dream_return += reward * alive / samples
                steps[alive & end] = t + 1
                alive &= ~end
            dream_len += steps / samples
        rows.append((name, np.mean(real_return), np.mean(real_len), float(dream_return.mean()), float(dream_len.mean())))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--starts", type=int, default=128)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ckpt = torch.load(os.path.join(cli.run, "checkpoint.pt"), map_location="cpu", weights_only=False)
    args = dataclasses.replace(I.Args(), **{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["args"].items()})
    if args.env_id != "MinAtar/Breakout-v1":
        raise SystemExit(f"This probe reads MinAtar Breakout's channels; '{cli.run}' is a run on {args.env_id}.")
    env = make_env(args.env_id, 0, pixels=True)
    tok = I.Tokenizer(env.observation_space.shape[0], args)
    wm = I.WorldModel(tok.tokens_per_frame, env.action_space.n, args)
    tok.load_state_dict(ckpt["tokenizer"])
    wm.load_state_dict(ckpt["wm"])
    tok.eval(), wm.eval()
    print(f"{cli.run}, epoch {ckpt['epoch']}, step {ckpt['global_step']}")
    p_end = termination_probe(tok, wm, args, env, cli.episodes, rng)
    print("teacher-forced P(end) on random play: " + ", ".join(
        f"{k} {np.mean(v):.2f} ({len(v)} steps)" for k, v in p_end.items()))
    print(f"{'policy':8s} {'real return':>11s} {'real steps':>10s} {'imagined return':>15s} {'imagined steps':>14s}")
    for name, rr, rl, dr, dl in counterfactual_probe(tok, wm, args, env, cli.starts, rng):
        print(f"{name:8s} {rr:11.2f} {rl:10.1f} {dr:15.2f} {dl:14.1f}")


if __name__ == "__main__":
    main()
