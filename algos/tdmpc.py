"""TD-MPC: "Temporal Difference Learning for Model Predictive Control", Hansen, Wang, Su (2022), arXiv 2203.04955.

A Task-Oriented Latent Dynamics model (TOLD: encoder h, latent dynamics d, reward R, twin Q, policy π) is
learned from H-step windows of replay by reward regression, TD learning and latent consistency (Eq. 3-5),
with no observation reconstruction. Actions come from MPPI (Algorithm 1): short model rollouts scored by
their rewards plus the learned Q at the horizon, warm-started from the previous step's solution.

Run:  python algos/tdmpc.py --env-id dm_control/cheetah-run-v0          (dmc preset, the paper's setting)
      python algos/tdmpc.py --env-id Pendulum-v1                        (small preset, CPU)
      python algos/tdmpc.py --env-id dm_control/cartpole-swingup-v0 --pixels   (conv encoder, 3 stacked frames)
      python algos/tdmpc.py --resume runs/<run_name> --env-id ...        (continue a stopped run)
The preset is chosen from the env id (dmc for dm_control/, small otherwise; pass --preset dmc for gymnasium
MuJoCo ids such as HalfCheetah-v5) or with --preset; every flag given explicitly wins over the preset.

Deviations from the paper / official code (nicklashansen/tdmpc):
 1. Terminations. The official code has fixed-length DMC episodes and no terminal states. Here the TD target
    is masked where the next observation is terminal (never at a time limit), and a window may run past a
    terminal row; its later steps are masked out of every loss. A window that would cross a time limit into
    the next episode is never sampled (the official code gives the last H starts of an episode priority 0).
 2. Updates are made one per agent step as in Algorithm 1 (plus the official burst of `seed_steps` updates
    when the seed phase ends), not in a block of episode-length updates after each episode; the count of
    updates is the official one. The std and horizon schedules read the current agent step.
 3. Greedy evaluation executes the planner's mean first action; the official evaluation draws one elite
    trajectory by its score (without noise). Executed actions are clipped to [-1, 1].
 4. Pixels: 64x64 frames (the project's size; the paper uses 84x84), random shifts of ±3 pixels (the official
    pad is img_size/21), frames stacked 3 by gymnasium's FrameStackObservation and stored stacked.
 5. TD-MPC has no observation decoder, so there is no open-loop video (media/openloop); the model's multi-step
    quality shows in the consistency and reward losses, which are summed over the H steps of each window.
 6. The `small` preset (CPU) is ours: MLPs of 256, batch 256, MPPI with 256 samples, 32 elites, 4 iterations,
    1,000 seed steps, schedules over 5,000 steps.
"""

# Imports
import copy
import os
import signal
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.envs import env_family, is_image_space, make_env  # noqa: E402
from common.replay import Replay  # noqa: E402
from common.run import (  # noqa: E402
    Progress, check_finite, choose_device, load_checkpoint, make_writer, mean, open_run, parse_args, require,
    save_checkpoint, seed_everything, to_device,
)


# Hyperparameters (defaults: the paper and the official cfgs/default.yaml)
@dataclass
class Args:
    exp_name: str = "tdmpc"
    """name of this experiment (the file name)"""
    env_id: str = "dm_control/cheetah-run-v0"
    """environment id with continuous actions (dm_control/*, gymnasium MuJoCo or any Box-observation id)"""
    preset: str = "dmc"
    """dmc | small; chosen from the env id unless given; explicit flags win over it"""
    seed: int = 0
    """seed of python, numpy, torch and the environment"""
    total_timesteps: int = 500_000
    """environment steps (counting action repeat) to train for"""
    cuda: bool = True
    """use CUDA if available (fp32 matmuls and convolutions then run in TF32: float32_matmul_precision high)"""
    torch_deterministic: bool = False
    """torch.backends.cudnn.deterministic and deterministic algorithms"""
    bf16: bool = False
    """bf16 autocast for the forward passes (training and planning); losses and optimizer state stay fp32"""
    capture_video: bool = False
    """record every 10th training episode to runs/<run>/videos"""
    save_model: bool = True
    """write runs/<run>/checkpoint.pt every checkpoint_every updates and at exit"""
    resume: str | None = None
    """a run directory to continue (same env id); its episodes are reloaded from disk"""
    eval_episodes: int = 10
    """episodes planned greedily (the planner's mean, no noise) at the end of training; 0: none"""
    log_every: int = 10_000
    """environment steps between progress lines and scalar logs"""
    checkpoint_every: int = 10_000
    """updates between checkpoints"""

    # environment
    action_repeat: int = 0
    """environment steps per action; 0 = TD-MPC's table (dm_control 4; cartpole 8; walker, humanoid, dog 2; else 1)"""
    pixels: bool = False
    """dm_control: 64x64 frames (3 stacked) through the conv encoder instead of proprioceptive vectors"""
    frame_stack: int = 3
    """frames stacked into one pixel observation"""

    # replay and schedule
    replay_capacity: int = 0
    """rows (agent steps) held in replay; 0 = every step of the run plus 1,000 (the official size)"""
    seed_steps: int = 5_000
    """agent steps of uniformly random actions; when they end, seed_steps updates are made at once"""
    batch_size: int = 512
    """windows per update"""
    per_alpha: float = 0.6
    """prioritized replay exponent α: P(i) ∝ p_i^α"""
    per_beta: float = 0.4
    """importance-weight exponent β: w_i = (N·P(i))^-β / max w"""

    # TOLD
    latent_dim: int = 50
    """size of the latent state z"""
    mlp_dim: int = 512
    """hidden units of the dynamics, reward, Q and policy MLPs"""
    enc_dim: int = 256
    """hidden units of the vector encoder"""
    num_channels: int = 32
    """channels of each conv layer of the pixel encoder"""
    horizon: int = 5
    """H: steps of each training window and of each planned trajectory"""
    discount: float = 0.99
    """γ"""
    rho: float = 0.5
    """ρ: the loss of window step t is weighted by ρ^t"""
    reward_coef: float = 0.5
    """c1: reward loss weight"""
    value_coef: float = 0.1
    """c2: value (TD) loss weight"""
    consistency_coef: float = 2.0
    """c3: latent consistency loss weight"""
    lr: float = 1e-3
    """Adam learning rate of the model and of the policy"""
    grad_clip: float = 10.0
    """global gradient norm clip"""
    tau: float = 0.01
    """Polyak rate of the target network"""
    update_freq: int = 2
    """updates between target network updates"""

    # MPPI planner (Algorithm 1)
    iterations: int = 6
    """optimisation iterations per planned action"""
    num_samples: int = 512
    """action sequences sampled from N(μ, σ²) per iteration"""
    num_elites: int = 64
    """k: elite sequences the distribution is refitted to"""
    mixture_coef: float = 0.05
    """fraction of num_samples added as trajectories of the policy π"""
    temperature: float = 0.5
    """τ: elite weights Ω_i = exp(τ (G_i − max G))"""
    momentum: float = 0.1
    """α: μ ← α μ + (1 − α) μ_new"""
    min_std: float = 0.05
    """final value of the std floor, and the std of the policy's noise"""
    std_init: float = 0.5
    """std floor of the planner at step 0 (linear schedule to min_std)"""
    schedule_steps: int = 25_000
    """agent steps over which the std floor goes std_init → min_std and the horizon 1 → H"""


PRESETS = {
    "dmc": {},
    "small": dict(
        total_timesteps=100_000, mlp_dim=256, enc_dim=128, batch_size=256, num_samples=256, num_elites=32,
        iterations=4, seed_steps=1_000, schedule_steps=5_000, log_every=2_000, checkpoint_every=2_000, eval_episodes=5,
    ),
}
TDMPC_ACTION_REPEAT = {"cartpole": 8, "walker": 2, "humanoid": 2, "dog": 2}  # official cfgs/tasks/*.yaml


def default_preset(env_id: str) -> str:
    return "dmc" if env_family(env_id) == "dmc" else "small"


def check_args(args: Args) -> None:
    """Each numeric flag in its range, before a run directory is made or an env built (common/run.py require)."""
    require(args, "≥ 1", lambda v: v >= 1, "total_timesteps", "log_every", "checkpoint_every", "frame_stack",
            "seed_steps", "batch_size", "latent_dim", "mlp_dim", "enc_dim", "num_channels", "horizon", "update_freq",
            "iterations", "num_samples", "schedule_steps")
    require(args, f"in 1 … --num-samples ({args.num_samples})", lambda v: 1 <= v <= args.num_samples, "num_elites")
    require(args, "≥ 0 (0: off)", lambda v: v >= 0, "eval_episodes")
    require(args, "≥ 0 (0: TD-MPC's table)", lambda v: v >= 0, "action_repeat")
    require(args, "≥ 0 (0: every step of the run plus 1,000)", lambda v: v >= 0, "replay_capacity")
    require(args, "≥ 0", lambda v: v >= 0, "seed", "per_alpha", "reward_coef", "value_coef", "consistency_coef",
            "min_std")
    require(args, "> 0", lambda v: v > 0, "lr", "grad_clip", "temperature", "std_init")
    require(args, "in [0, 1]", lambda v: 0 <= v <= 1, "per_beta", "mixture_coef", "momentum")
    require(args, "in (0, 1]", lambda v: 0 < v <= 1, "discount", "rho", "tau")


def tdmpc_action_repeat(env_id: str) -> int:
    """The official per-domain action repeat for dm_control (default 4); 1 for anything else."""
    if env_family(env_id) != "dmc":
        return 1
    return TDMPC_ACTION_REPEAT.get(env_id.split("/")[-1].split("-")[0], 4)


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    mix = min(max(step / duration, 0.0), 1.0)
    return (1 - mix) * start + mix * end


# Networks
def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    """Two ELU layers of `hidden`, then a linear output (the official h.mlp)."""
    return nn.Sequential(nn.Linear(inp, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, out))


def q_net(inp: int, hidden: int) -> nn.Sequential:
    """Q_θ: Linear, LayerNorm, tanh at the input, then ELU and a linear output (the official h.q)."""
    return nn.Sequential(nn.Linear(inp, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ELU(),
                         nn.Linear(hidden, 1))


class TOLD(nn.Module):
    """Task-Oriented Latent Dynamics (Section 3.1):
        representation  z_t = h_θ(s_t)            latent dynamics  z_{t+1} = d_θ(z_t, a_t)
        reward          r̂_t = R_θ(z_t, a_t)        value            q̂_t = Q_θ(z_t, a_t)  (two of them)
        policy          â_t = π_θ(z_t)
    """

    def __init__(self, obs_space: gym.spaces.Box, action_dim: int, args: Args):
        super().__init__()
        L, A, M = args.latent_dim, action_dim, args.mlp_dim
        self.pixels = is_image_space(obs_space)
        if self.pixels:  # four conv layers (kernels 7, 5, 3, 3, stride 2, ReLU), then linear to z
            c, n = obs_space.shape[0], args.num_channels
            convs = nn.Sequential(nn.Conv2d(c, n, 7, 2), nn.ReLU(), nn.Conv2d(n, n, 5, 2), nn.ReLU(),
                                  nn.Conv2d(n, n, 3, 2), nn.ReLU(), nn.Conv2d(n, n, 3, 2), nn.ReLU(), nn.Flatten())
            flat = convs(torch.zeros(1, *obs_space.shape)).shape[1]
            self.encoder = nn.Sequential(*convs, nn.Linear(flat, L))
        else:
            self.encoder = nn.Sequential(nn.Linear(obs_space.shape[0], args.enc_dim), nn.ELU(), nn.Linear(args.enc_dim, L))
        self.dynamics = mlp(L + A, M, L)
        self.reward = mlp(L + A, M, 1)
        self.pi = mlp(L, M, A)
        self.q1, self.q2 = q_net(L + A, M), q_net(L + A, M)
        for m in self.modules():  # orthogonal init (ReLU gain for convs), zero biases
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.orthogonal_(m.weight, nn.init.calculate_gain("relu") if isinstance(m, nn.Conv2d) else 1.0)
                nn.init.zeros_(m.bias)
        for head in (self.reward, self.q1, self.q2):  # last layers of R and Q start at zero
            nn.init.zeros_(head[-1].weight)

    def h(self, obs):
        if self.pixels:
            obs = obs.float().div(255.0)
        return self.encoder(obs)

    def next(self, z, a):
        x = torch.cat([z, a], -1)
        return self.dynamics(x), self.reward(x)

    def Q(self, z, a):
        x = torch.cat([z, a], -1)
        return self.q1(x), self.q2(x)

    def policy(self, z, std: float = 0.0):
        """π(z) = tanh(μ_θ(z)); with std > 0 the official truncated-normal sample: noise clipped to ±0.3, the
        action clamped inside (-1, 1) with a straight-through gradient."""
        mu = torch.tanh(self.pi(z))
        if std <= 0:
            return mu
        a = mu + (torch.randn_like(mu) * std).clamp(-0.3, 0.3)
        return a + (a.clamp(-1 + 1e-6, 1 - 1e-6) - a).detach()


def random_shift(x, pad: int):
    """Random shift augmentation (DrQ): replicate-pad by `pad`, crop back at a random integer offset per image."""
    n, _, h, w = x.shape
    x = F.pad(x.float(), (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
    return x[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


# Prioritized replay of H-step windows (official ReplayBuffer with PER)
def valid_windows(is_first, terminated):
    """Which windows may be trained on, given rows i+1 … i+H of each (arrays (..., H)).

    A window starting at row i must stay inside one episode, except that rows after a terminal row are
    allowed (and masked out of the losses, see `alive_mask`): nothing follows a terminal state anyway.
    So row i+t may be a reset (is_first) only if some row i+1 … i+t−1 was terminal.
    """
    is_first, terminated = np.asarray(is_first, bool), np.asarray(terminated, bool)
    ended = np.cumsum(terminated, -1) - terminated > 0  # a terminal row strictly before row i+t
    return np.all(~is_first | ended, -1)


def alive_mask(terminated):
    """alive[:, t] = 1 while no row i+1 … i+t is terminal, for t = 0 … H (terminated: (B, H) of rows i+1 … i+H).

        t        :  0    1    2    3
        row      :  i   i+1  i+2  i+3
        terminal :  -    F    T    (next episode)
        alive    :  1    1    0    0      step 1, the transition into the terminal row i+2, is still learned
    Loss step t (the transition row i+t → row i+t+1) uses alive[:, t]; the policy at z_t uses alive[:, t].
    """
    ones = torch.ones_like(terminated[:, :1], dtype=torch.float32)
    return torch.cat([ones, torch.cumprod(1.0 - terminated.float(), 1)], 1)


class PrioritizedWindows:
    """Priorities over the rows of a common Replay, each row the start of an H-step window.

    A new row gets priority 0 until the H rows after it exist; then its window gets the largest priority
    held (1 at first) if `valid_windows` allows it, else stays 0 forever. Sampling draws B distinct starts
    with P(i) = p_i^α / Σ_j p_j^α and importance weights w_i = (N P(i))^-β / max_batch w, N the rows held
    (official ReplayBuffer.sample); after an update p_i = Σ_t ρ^t (|Q1 − y| + |Q2 − y|) + 1e-6.
    """

    def __init__(self, replay: Replay, horizon: int, alpha: float, beta: float):
        self.replay, self.H, self.alpha, self.beta = replay, horizon, alpha, beta
        self.priority = np.zeros(replay.capacity, np.float64)

    def add(self, **row) -> None:
        r = self.replay
        new = r.next  # physical index the row is written to
        r.add(**row)
        self.priority[new] = 0.0
        if r.size > self.H:  # the window starting H rows back is now complete
            start = (new - self.H) % r.capacity
            rows = (start + 1 + np.arange(self.H)) % r.capacity
            if valid_windows(r.data["is_first"][rows], r.data["terminated"][rows]):
                self.priority[start] = self.priority.max() or 1.0

    def reset_from_replay(self) -> None:
        """Priority 1 for every complete valid window (after loading episodes from disk)."""
        r = self.replay
        self.priority[:] = 0.0
        oldest = (r.next - r.size) % r.capacity
        starts = (oldest + np.arange(max(r.size - self.H, 0))) % r.capacity
        rows = (starts[:, None] + 1 + np.arange(self.H)) % r.capacity
        if len(starts):
            self.priority[starts[valid_windows(r.data["is_first"][rows], r.data["terminated"][rows])]] = 1.0

    def probabilities(self) -> np.ndarray:
        p = self.priority[: self.replay.size] ** self.alpha
        if not p.sum() > 0:
            raise ValueError(f"No complete {self.H}-step window in replay yet ({self.replay.size} rows): "
                             "collect more steps before the first update (--seed-steps).")
        return p / p.sum()

    def sample(self, batch_size: int) -> tuple[dict, np.ndarray, np.ndarray]:
        """(rows (B, H+1, ...) starting at each drawn row, their physical indices, importance weights)."""
        r = self.replay
        probs = self.probabilities()
        replace = np.count_nonzero(probs) < batch_size
        idx = r.rng.choice(r.size, batch_size, p=probs, replace=replace)
        weights = (r.size * probs[idx]) ** -self.beta
        weights /= weights.max()
        rows = (idx[:, None] + np.arange(self.H + 1)) % r.capacity
        return {k: arr[rows] for k, arr in r.data.items()}, idx, weights.astype(np.float32)

    def update(self, idx: np.ndarray, priorities: np.ndarray) -> None:
        self.priority[idx] = priorities + 1e-6


def window_batch(rows: dict, device) -> dict:
    """Replay rows i … i+H (common/replay.py alignment) → the quantities of one training window:

        row      :  i     i+1   i+2  …  i+H
        obs      :  s_0   s_1   s_2     s_H      obs = s_0; next_obs[t] = s_{t+1}
        action   :  -     a_0   a_1     a_{H-1}  action[t] = a_t, taken at s_t (stored with the row it produced)
        reward   :  -     r_0   r_1     r_{H-1}  reward[t] = r_t, earned by a_t
        terminal :  -     d_0   d_1     d_{H-1}  terminated[t]: s_{t+1} is terminal
    Tensors are (H, B, ...) for the per-step quantities.
    """
    rows = to_device({k: rows[k] for k in ("obs", "action", "reward", "terminated")}, device)
    t = lambda k: rows[k][:, 1:].transpose(0, 1)  # noqa: E731
    terminated = rows["terminated"][:, 1:]
    return dict(obs=rows["obs"][:, 0], next_obs=t("obs"), action=t("action").float(),
                reward=t("reward").float(), terminated=t("terminated").float(), alive=alive_mask(terminated).T)


# Losses and targets
@torch.no_grad()
def td_target(model: TOLD, target: TOLD, next_obs, reward, terminated, discount: float, min_std: float):
    """Eq. 4's target: y_t = r_t + γ (1 − d_t) min_{i=1,2} Q̄_i(z', π_θ(z')), z' = h_θ(s_{t+1}).

    As in the official code, z' comes from the online encoder and π adds its min_std noise; only the Q
    functions are the target network's. d_t masks terminal next states only, never time limits.
    """
    next_z = model.h(next_obs)
    q1, q2 = target.Q(next_z, model.policy(next_z, min_std))
    return reward + discount * (1.0 - terminated) * torch.min(q1, q2).squeeze(-1).float()


def told_loss(model: TOLD, target: TOLD, batch: dict, weights, args: Args, aug_pad: int = 0):
    """Eq. 3-5 over the window, each step t weighted by ρ^t:

        J = Σ_t ρ^t [ c1 ‖R_θ(z_t, a_t) − r_t‖²                          (reward)
                     + c2 Σ_i ‖Q_θi(z_t, a_t) − y_t‖²                     (value, y_t from `td_target`)
                     + c3 ‖d_θ(z_t, a_t) − h_θ̄(s_{t+1})‖² / dim(z) ]     (consistency with the TARGET
                                                                          encoder of the NEXT observation)
    with z_0 = h_θ(s_0) and z_{t+1} = d_θ(z_t, a_t) rolled out through the model. Each sample's J is weighted
    by its PER weight; the mean is divided by H (the official gradient hook scales by 1/H).
    Returns (loss, priorities (B,), rolled-out latents (H+1, B, L) detached, metrics).
    """
    H = batch["action"].shape[0]
    aug = (lambda x: random_shift(x, aug_pad)) if aug_pad else (lambda x: x)  # noqa: E731
    next_obs = batch["next_obs"].flatten(0, 1)  # (H·B, ...)
    z = model.h(aug(batch["obs"]))
    zs = [z]
    for t in range(H):
        z = model.dynamics(torch.cat([z, batch["action"][t]], -1))
        zs.append(z)
    z_seq = torch.stack(zs)  # z_0 … z_H
    za = torch.cat([z_seq[:-1], batch["action"]], -1)  # (z_t, a_t) for t < H
    reward_pred = model.reward(za).squeeze(-1).float()
    q1, q2 = (q.squeeze(-1).float() for q in model.Q(z_seq[:-1], batch["action"]))
    with torch.no_grad():
        next_aug = aug(next_obs)
        next_z_target = target.h(next_aug).view(H, -1, args.latent_dim).float()
        y = td_target(model, target, next_aug, batch["reward"].flatten(), batch["terminated"].flatten(), args.discount,
                      args.min_std).view(H, -1)
    rho = rho_weights(args.rho, batch["alive"][:H])
    consistency = (rho * (z_seq[1:].float() - next_z_target).pow(2).mean(-1)).sum(0)  # (B,): Σ_t ρ^t · term_t
    reward_err = (rho * (reward_pred - batch["reward"]).pow(2)).sum(0)
    value_err = (rho * ((q1 - y).pow(2) + (q2 - y).pow(2))).sum(0)
    per_sample = (args.consistency_coef * consistency.clamp(max=1e4) + args.reward_coef * reward_err.clamp(max=1e4)
                  + args.value_coef * value_err.clamp(max=1e4))
    loss = (per_sample * weights).mean() / H
    priority = (rho * ((q1 - y).abs() + (q2 - y).abs())).sum(0).clamp(max=1e4).detach()
    metrics = dict(consistency_loss=consistency.mean(), reward_loss=reward_err.mean(), value_loss=value_err.mean(),
                   total_loss=loss)
    return loss, priority, z_seq.detach(), metrics


def rho_weights(rho: float, alive):
    """ρ^t for the rows t = 0, 1, … of `alive` (T, B), zero where the window has ended at a terminal state."""
    return (rho ** torch.arange(alive.shape[0], device=alive.device, dtype=torch.float32))[:, None] * alive


def policy_loss(model: TOLD, zs, alive, args: Args):
    """L_π = −Σ_t ρ^t min_i Q_θi(z_t, π_θ(z_t)) over the window's latents (sg), Q frozen (Section 3.2)."""
    rho = rho_weights(args.rho, alive)
    q1, q2 = model.Q(zs, model.policy(zs, args.min_std))
    return -(rho * torch.min(q1, q2).squeeze(-1).float()).sum(0).mean()


def update(model: TOLD, target: TOLD, opt, pi_opt, batch: dict, weights, args: Args, updates: int, save,
           aug_pad: int = 0):
    """One TD-MPC update: the TOLD loss on the model, then the policy with Q frozen, then (every
    update_freq updates) the target network by Polyak averaging. Returns (priorities, metrics)."""
    with torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16):
        loss, priority, zs, metrics = told_loss(model, target, batch, weights, args, aug_pad)
    check_finite({"total_loss": loss}, updates, save)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    metrics["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()

    for p in (*model.q1.parameters(), *model.q2.parameters()):
        p.requires_grad_(False)
    with torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16):
        pi_loss = policy_loss(model, zs, batch["alive"], args)
    check_finite({"pi_loss": pi_loss}, updates, save)
    pi_opt.zero_grad(set_to_none=True)
    pi_loss.backward()
    nn.utils.clip_grad_norm_(model.pi.parameters(), args.grad_clip)
    pi_opt.step()
    for p in (*model.q1.parameters(), *model.q2.parameters()):
        p.requires_grad_(True)
    metrics["pi_loss"] = pi_loss

    if updates % args.update_freq == 0:
        with torch.no_grad():
            for p, p_target in zip(model.parameters(), target.parameters()):
                p_target.lerp_(p, args.tau)
    return priority.cpu().numpy(), {k: v.detach() for k, v in metrics.items()}


# Acting: MPPI planning (Algorithm 1)
@torch.no_grad()
def estimate_value(model: TOLD, z, actions, discount: float, min_std: float):
    """G = Σ_{t<H} γ^t R_θ(z_t, a_t) + γ^H min_i Q_θi(z_H, π_θ(z_H)) for each sampled sequence (actions (H, N, A))."""
    G, scale = 0.0, 1.0
    for t in range(actions.shape[0]):
        z, r = model.next(z, actions[t])
        G = G + scale * r.squeeze(-1).float()
        scale *= discount
    q1, q2 = model.Q(z, model.policy(z, min_std))
    return G + scale * torch.min(q1, q2).squeeze(-1).float()


def warm_start(prev_mean, horizon: int, action_dim: int, device):
    """μ for the first iteration: the previous step's solution shifted one step earlier, zeros at the end
    (and zeros everywhere at the first step of an episode). If the horizon schedule changed, the overlap is kept."""
    mean = torch.zeros(horizon, action_dim, device=device)
    if prev_mean is not None:
        shifted = prev_mean[1:]
        n = min(len(shifted), horizon)
        mean[:n] = shifted[:n]
    return mean


@torch.no_grad()
def mppi(value_fn, mean, std_floor: float, num_samples: int, num_elites: int, iterations: int, temperature: float,
         momentum: float, extra_actions=None, std_init: float = 2.0):
    """Algorithm 1, lines 5-12: sample N sequences from N(μ, σ²) (clipped to [-1, 1]), add the policy's
    sequences, score them with `value_fn` ((H, N, A) -> (N,)), keep the k elites, and refit

        Ω_i = exp(τ (G_i − max G)),  μ' = Σ Ω_i Γ_i / Σ Ω_i,  σ' = sqrt(Σ Ω_i (Γ_i − μ')² / Σ Ω_i) clamped to [floor, 2],
        μ ← α μ + (1 − α) μ',  σ ← σ'.

    Returns (μ, σ of the last refit, the last elites (H, k, A), their normalised scores (k,))."""
    H, A = mean.shape
    std = torch.full_like(mean, std_init)
    for _ in range(iterations):
        actions = (mean[:, None] + std[:, None] * torch.randn(H, num_samples, A, device=mean.device)).clamp(-1, 1)
        if extra_actions is not None:
            actions = torch.cat([actions, extra_actions], 1)
        value = value_fn(actions).nan_to_num(0.0)
        elite_value, elite_idx = value.topk(num_elites)
        elites = actions[:, elite_idx]  # (H, k, A)
        score = torch.exp(temperature * (elite_value - elite_value.max()))
        score = score / score.sum()
        new_mean = (score[None, :, None] * elites).sum(1)
        new_std = (score[None, :, None] * (elites - new_mean[:, None]).pow(2)).sum(1).sqrt().clamp(std_floor, 2.0)
        mean, std = momentum * mean + (1 - momentum) * new_mean, new_std
    return mean, std, elites, score


class Planner:
    """TD-MPC's `plan`: encode, roll out the policy's trajectories, MPPI, and pick the executed action."""

    def __init__(self, model: TOLD, action_dim: int, args: Args, device):
        self.model, self.action_dim, self.args, self.device = model, action_dim, args, device
        self.prev_mean = None

    def horizon(self, step: int) -> int:
        a = self.args
        return int(min(a.horizon, linear_schedule(1, a.horizon, a.schedule_steps, step)))

    @torch.no_grad()
    def act(self, obs, is_first: bool, explore: bool, step: int):
        a, model = self.args, self.model
        H = self.horizon(step)
        std_floor = linear_schedule(a.std_init, a.min_std, a.schedule_steps, step)
        num_pi = int(a.mixture_coef * a.num_samples)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            z0 = model.h(torch.as_tensor(obs, device=self.device)[None])
            pi_actions = None
            if num_pi > 0:  # trajectories of the policy π, with its noise, through the model
                z, steps = z0.expand(num_pi, -1), []
                for _ in range(H):
                    steps.append(model.policy(z, a.min_std).float())
                    z, _ = model.next(z, steps[-1])
                pi_actions = torch.stack(steps)
            z_all = z0.expand(a.num_samples + num_pi, -1)
            mean = warm_start(None if is_first else self.prev_mean, H, self.action_dim, self.device)
            mean, std, elites, score = mppi(lambda acts: estimate_value(model, z_all, acts, a.discount, a.min_std), mean,
                                            std_floor, a.num_samples, a.num_elites, a.iterations, a.temperature,
                                            a.momentum, pi_actions)
        self.prev_mean = mean
        if not explore:
            return mean[0].clamp(-1, 1).cpu().numpy()
        chosen = elites[0, torch.multinomial(score, 1)[0]]  # one elite trajectory, drawn by its score
        return (chosen + std[0] * torch.randn_like(chosen)).clamp(-1, 1).float().cpu().numpy()


def make_tdmpc_env(args: Args, seed: int, capture_video: bool = False, video_dir: str | None = None):
    env = make_env(args.env_id, seed, pixels=args.pixels, action_repeat=args.action_repeat,
                   capture_video=capture_video, video_dir=video_dir)
    if args.pixels:  # k stacked frames (k·C, H, W), the first frame repeated after a reset
        env = gym.wrappers.FrameStackObservation(env, args.frame_stack, padding_type="reset")
        k, c, h, w = env.observation_space.shape
        space = gym.spaces.Box(0, 255, (k * c, h, w), np.uint8)
        env = gym.wrappers.TransformObservation(env, lambda o: np.asarray(o).reshape(k * c, h, w), space)
    return env


def evaluate(planner: Planner, args: Args, episodes: int, step: int) -> list[float]:
    """Episodes planned greedily (the planner's mean action) in a fresh env; returns their raw returns."""
    env = make_tdmpc_env(args, args.seed + 10_000)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=args.seed + 10_000 + ep)
        is_first, done, total = True, False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(planner.act(obs, is_first, explore=False, step=step))
            total += float(reward)
            is_first, done = False, terminated or truncated
        returns.append(total)
    env.close()
    return returns


# Training loop (Algorithm 1 of the paper)
def main(args: Args):
    check_args(args)
    if args.action_repeat == 0:
        args.action_repeat = tdmpc_action_repeat(args.env_id)
    try:  # a bad env id or space stops here, before a run directory is made
        if args.pixels and env_family(args.env_id) != "dmc":
            raise ValueError(f"--pixels is for dm_control ids; '{args.env_id}' is trained from its vector observations.")
        env = make_tdmpc_env(args, args.seed)
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ValueError(f"'{args.env_id}' has discrete actions; TD-MPC's MPPI planner searches continuous actions "
                             f"(use dreamer_v2.py for discrete ones).")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    action_dim = env.action_space.shape[0]
    run_dir, resumed = open_run(args)
    if args.capture_video:
        env.close()
        env = make_tdmpc_env(args, args.seed, capture_video=True, video_dir=os.path.join(run_dir, "videos"))
    seed_everything(args.seed, args.torch_deterministic)
    device = choose_device(args.cuda)

    model = TOLD(env.observation_space, action_dim, args).to(device)
    target = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), args.lr)
    pi_opt = torch.optim.Adam(model.pi.parameters(), args.lr)
    capacity = args.replay_capacity or args.total_timesteps // args.action_repeat + 1_000
    replay = Replay(capacity, os.path.join(run_dir, "episodes"), seed=args.seed)
    windows = PrioritizedWindows(replay, args.horizon, args.per_alpha, args.per_beta)
    aug_pad = int(env.observation_space.shape[-1] / 21) if model.pixels else 0

    global_step, agent_steps, updates, episodes, last_return = 0, 0, 0, 0, None
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resumed:
        ckpt = load_checkpoint(ckpt_path, device, model=model, target=target, opt=opt, pi_opt=pi_opt)
        global_step, updates, episodes, last_return = (ckpt["global_step"], ckpt["updates"], ckpt["episodes"],
                                                       ckpt.get("last_return"))
        agent_steps = global_step // args.action_repeat  # every agent step adds action_repeat env steps
        rows = replay.load()
        replay.rng.bit_generator.state = ckpt["replay_rng"]
        if (replay.size, replay.next) == (ckpt["replay_size"], ckpt["replay_next"]):
            windows.priority[: replay.size] = ckpt["priority"]
        else:  # rows were lost or added after the checkpoint (a hard kill): start the priorities afresh
            windows.reset_from_replay()
            print("resume: the replay on disk differs from the checkpoint's; priorities reset to 1")
        print(f"resumed {run_dir} at step {global_step}, update {updates}; {rows} replay rows reloaded")
    writer = make_writer(run_dir, args, resumed)
    print(f"run: {run_dir}  preset: {args.preset}  obs {env.observation_space.shape}  actions {action_dim}  "
          f"action repeat {args.action_repeat}")

    def save():
        replay.save_partial()
        if args.save_model:
            save_checkpoint(ckpt_path, dict(
                model=model.state_dict(), target=target.state_dict(), opt=opt.state_dict(), pi_opt=pi_opt.state_dict(),
                global_step=global_step, updates=updates, episodes=episodes,
                last_return=last_return, priority=windows.priority[: replay.size].copy(), replay_size=replay.size,
                replay_next=replay.next, replay_rng=replay.rng.bit_generator.state, args=vars(args)))
        return ckpt_path

    stop = []  # SIGTERM / Ctrl-C set this; the loop stops between steps, never inside an update
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))

    def train_once():
        nonlocal updates
        t0 = time.perf_counter()
        rows, idx, weights = windows.sample(args.batch_size)
        batch = window_batch(rows, device)
        priority, metrics = update(model, target, opt, pi_opt, batch, torch.as_tensor(weights, device=device), args,
                                   updates, save, aug_pad)
        windows.update(idx, priority)
        updates += 1
        for k, v in metrics.items():
            metrics_log.setdefault(k, []).append(v)  # a device tensor, read when logged
        metrics_log.setdefault("train_step_ms", []).append(1000 * (time.perf_counter() - t0))
        if args.save_model and updates % args.checkpoint_every == 0:
            save()

    planner = Planner(model, action_dim, args, device)
    metrics_log: dict[str, list] = {}
    progress = Progress(args.total_timesteps, global_step, "seed" if updates == 0 else "train")
    next_log = (global_step // args.log_every + 1) * args.log_every
    zero_action = np.zeros(action_dim, np.float32)
    obs, _ = env.reset(seed=args.seed + global_step)
    is_first = True
    try:
        windows.add(obs=obs, action=zero_action, reward=0.0, terminated=False, truncated=False, is_first=True)
        while global_step < args.total_timesteps:
            if stop:
                raise KeyboardInterrupt
            # Act: uniform random during the seed steps, else MPPI with exploration
            if agent_steps < args.seed_steps:
                action = env.action_space.sample().astype(np.float32)
            else:
                t0 = time.perf_counter()
                action = planner.act(obs, is_first, explore=True, step=agent_steps)
                metrics_log.setdefault("plan_ms", []).append(1000 * (time.perf_counter() - t0))
            obs, reward, terminated, truncated, info = env.step(action)
            global_step += args.action_repeat
            agent_steps += 1
            windows.add(obs=obs, action=action, reward=reward, terminated=terminated, truncated=truncated, is_first=False)
            is_first = False
            if "episode" in info:
                last_return = float(info["episode"]["r"])
                writer.add_scalar("charts/episodic_return", last_return, global_step)
                writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]) * args.action_repeat, global_step)
            if terminated or truncated:
                episodes += 1
                obs, _ = env.reset()
                is_first = True
                windows.add(obs=obs, action=zero_action, reward=0.0, terminated=False, truncated=False, is_first=True)

            # Update: one per agent step once the seed steps are in, so the first call makes seed_steps
            # updates at once (the official burst) and a run stopped inside the burst finishes it on resume
            if agent_steps >= args.seed_steps:
                if updates == 0:
                    progress.start_phase("train", global_step)
                while updates < agent_steps:
                    if stop:
                        raise KeyboardInterrupt
                    train_once()

            if global_step >= next_log:
                next_log += args.log_every
                for k, v in metrics_log.items():
                    tag = "perf" if k.endswith("_ms") else "losses"
                    writer.add_scalar(f"{tag}/{k}", mean(v), global_step)
                metrics_log.clear()
                writer.add_scalar("charts/SPS", progress.sps(global_step), global_step)
                writer.add_scalar("charts/planning_horizon", planner.horizon(agent_steps), global_step)
                writer.add_scalar("charts/std_floor", linear_schedule(args.std_init, args.min_std, args.schedule_steps,
                                                                      agent_steps), global_step)
                print(progress.line(global_step, last_return), f"updates {updates}  episodes {episodes}", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted at step {global_step}; saving checkpoint and the unfinished episode")
        save()
        writer.close()
        env.close()
        sys.exit(130)
    except BaseException:
        replay.save_partial()  # a crash keeps every collected step on disk
        raise
    save()
    if args.eval_episodes > 0:
        returns = evaluate(planner, args, args.eval_episodes, agent_steps)
        for r in returns:
            writer.add_scalar("eval/episodic_return", r, global_step)
        print(f"eval: mean return {np.mean(returns):.1f} over {len(returns)} episodes, planner mean without noise")
    writer.close()
    env.close()


if __name__ == "__main__":
    main(parse_args(Args, PRESETS, default_preset))
