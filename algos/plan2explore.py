"""Plan2Explore: "Planning to Explore via Self-Supervised World Models", Sekar, Rybkin, Daniilidis, Abbeel, Hafner,
Pathak (2020), arXiv 2005.05960.

A Dreamer world model (RSSM, encoder, decoder, reward head) is learned from data that an exploration policy
collects without any reward: that policy is trained in imagination to maximise expected novelty, the
disagreement (variance) of an ensemble of K one-step models that predict the next observation embedding
(Eq. 5). A separate task actor-critic is trained purely in imagination on the reward head; it adapts
zero-shot (no environment step) or few-shot (a limited number of steps) after exploration.

Run:  python algos/plan2explore.py --env-id dm_control/walker-walk-v0        (dmc preset: pixels, the paper)
      python algos/plan2explore.py --env-id dm_control/point_mass-easy-v0 --preset small --pixels False
      python algos/plan2explore.py --resume runs/<run_name> --env-id ...    (continue a stopped run, any phase)
Phases: (1) exploration for --total-timesteps env steps (the exploration policy acts; the reward head is
trained on the stored task rewards with its gradient stopped at the features, so the representation stays
task-agnostic), (2) zero-shot: --task-updates updates of the reward head and the task actor-critic on the
collected data with no environment step, then a greedy evaluation, (3) few-shot: --adapt-steps more env steps
collected by the task policy while everything keeps training, then a second evaluation.

Deviations from the paper / official code (ramanans1/plan2explore):
 1. The ensemble members are trained on the same batches and differ by their initialisation; the official
    code's bootstrap option is not implemented.
 2. The intrinsic reward is the disagreement times --intrinsic-scale (10,000, the official
    intrinsic_reward_scale); --normalize-intrinsic divides it by a running mean of its magnitude instead
    (momentum 0.99), which makes the scale irrelevant (used by the small preset on vectors).
 3. Imagination uses a constant discount (no continuation head): DMC has no terminal states.
 4. Continuous actions only (DMC); a discrete action space stops with one sentence.
 5. The zero-shot phase's extra updates (--task-updates, ours) come on top of the task actor-critic trained
    alongside exploration, as in the official code; the paper evaluates the latter directly.
 6. The `small` preset (CPU) is ours: deter 200, stoch 30, MLPs of 200 (the one-step models' hidden layers too,
    instead of the embedding size), CNN depth 16, batch 16 × 50, train every 500 env steps, no free nats,
    normalised intrinsic reward.
"""

# Imports
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.envs import default_action_repeat, env_family, is_image_space, make_env  # noqa: E402
from common.replay import Replay  # noqa: E402
from common.run import (  # noqa: E402
    Progress, add_video, check_finite, choose_device, load_checkpoint, make_writer, mean, open_run, parse_args,
    require, save_checkpoint, seed_everything, to_device,
)


# Hyperparameters (defaults: the paper's DMC setting and the official code; Dreamer's where they share one)
@dataclass
class Args:
    exp_name: str = "plan2explore"
    """name of this experiment (the file name)"""
    env_id: str = "dm_control/walker-walk-v0"
    """environment id with continuous actions (dm_control/*, or any Box-observation gymnasium id)"""
    preset: str = "dmc"
    """dmc | small; chosen from the env id unless given; explicit flags win over it"""
    seed: int = 0
    """seed of python, numpy, torch and the environment"""
    total_timesteps: int = 1_000_000
    """environment steps (counting action repeat) of task-agnostic exploration"""
    task_updates: int = 1_000
    """zero-shot phase: updates of the reward head and task actor-critic after exploration, no env steps; 0: none"""
    adapt_steps: int = 0
    """few-shot phase: environment steps collected by the task policy after the zero-shot evaluation; 0: none"""
    cuda: bool = True
    """use CUDA if available (fp32 matmuls and convolutions then run in TF32: float32_matmul_precision high)"""
    torch_deterministic: bool = False
    """torch.backends.cudnn.deterministic and deterministic algorithms"""
    bf16: bool = False
    """bf16 autocast for the forward passes; losses and optimizer state stay fp32"""
    capture_video: bool = False
    """record every 10th training episode to runs/<run>/videos"""
    save_model: bool = True
    """write runs/<run>/checkpoint.pt every checkpoint_every updates and at exit"""
    resume: str | None = None
    """a run directory to continue (same env id); its episodes are reloaded from disk"""
    eval_episodes: int = 10
    """greedy episodes of the task policy after the zero-shot phase (and after the few-shot phase); 0: none"""
    log_every: int = 10_000
    """environment steps between progress lines and scalar logs"""
    video_every: int = 1_000
    """updates between open-loop videos (media/openloop); 0: none"""
    checkpoint_every: int = 1_000
    """updates between checkpoints"""

    # environment
    action_repeat: int = 0
    """environment steps per agent step; 0 = the env family's default (DMC 2, as Dreamer)"""
    pixels: bool | None = None
    """dm_control: True images (the paper), False proprioceptive vectors; None = the env family's default"""

    # replay and schedule
    replay_capacity: int = 1_000_000
    """rows (agent steps) held in replay"""
    prefill: int = 5_000
    """environment steps of uniformly random actions before training"""
    pretrain: int = 100
    """updates made once, right after the prefill"""
    train_every: int = 1_000
    """environment steps between rounds of training"""
    train_steps: int = 100
    """updates per round"""
    batch_size: int = 50
    """sequences per batch"""
    batch_length: int = 50
    """steps per sequence"""

    # world model (official plan2explore: model_size 400, state_size 60)
    deter: int = 400
    """GRU state size h"""
    stoch: int = 60
    """Gaussian stochastic state size s"""
    hidden: int = 400
    """hidden units of the RSSM's input/output layers"""
    units: int = 400
    """units of every dense layer (reward, value, action models, vector encoder/decoder)"""
    cnn_depth: int = 32
    """channels of the first conv layer (doubling each of the four layers)"""
    min_std: float = 0.1
    """minimum standard deviation of the prior and posterior"""
    free_nats: float = 3.0
    """free nats on the mean KL: max(mean KL, free_nats)"""
    kl_scale: float = 1.0
    """β, the KL loss scale"""
    model_lr: float = 6e-4
    """world model (and ensemble) learning rate"""

    # ensemble and intrinsic reward (Eq. 5)
    ensemble_size: int = 10
    """K one-step models"""
    ensemble_units: int = 0
    """hidden units of each one-step model's two layers; 0 = the embedding size (official: model_width_factor 1)"""
    intrinsic_scale: float = 10_000.0
    """the disagreement is multiplied by this (official intrinsic_reward_scale)"""
    normalize_intrinsic: bool = False
    """divide the intrinsic reward by a running mean of its magnitude instead of scaling it"""

    # behaviour (both actor-critics)
    horizon: int = 15
    """imagination horizon H"""
    gamma: float = 0.99
    """discount γ"""
    lambda_: float = 0.95
    """λ of V_λ"""
    actor_lr: float = 8e-5
    """action model learning rate"""
    value_lr: float = 8e-5
    """value model learning rate"""
    action_init_std: float = 5.0
    """initial std of the tanh-Gaussian action models"""
    action_mean_scale: float = 5.0
    """the pre-tanh mean is mean_scale · tanh(x / mean_scale)"""
    expl_amount: float = 0.3
    """std of the additive Gaussian noise on collected actions"""
    adam_eps: float = 1e-7
    """Adam epsilon"""
    grad_clip: float = 100.0
    """global gradient norm clip per optimizer"""


PRESETS = {
    "dmc": {},
    "small": dict(
        total_timesteps=50_000, prefill=2_500, train_every=500, batch_size=16, deter=200, stoch=30, hidden=200,
        units=200, ensemble_units=200, cnn_depth=16, free_nats=0.0, normalize_intrinsic=True, task_updates=500,
        log_every=1_000,
        video_every=200, checkpoint_every=200, eval_episodes=5,
    ),
}


def default_preset(env_id: str) -> str:
    return "dmc" if env_family(env_id) == "dmc" else "small"


def check_args(args: Args) -> None:
    """Each numeric flag in its range, before a run directory is made or an env built (common/run.py require)."""
    require(args, "≥ 1", lambda v: v >= 1, "total_timesteps", "log_every", "checkpoint_every", "replay_capacity",
            "prefill", "pretrain", "train_every", "train_steps", "batch_size", "batch_length", "deter", "stoch",
            "hidden", "units", "cnn_depth", "horizon")
    require(args, "≥ 2 (disagreement is a variance over the ensemble)", lambda v: v >= 2, "ensemble_size")
    require(args, "≥ 0 (0: off)", lambda v: v >= 0, "eval_episodes", "video_every", "task_updates", "adapt_steps")
    require(args, "≥ 0 (0: the env family's default)", lambda v: v >= 0, "action_repeat")
    require(args, "≥ 0 (0: the embedding size)", lambda v: v >= 0, "ensemble_units")
    require(args, "≥ 0", lambda v: v >= 0, "seed", "min_std", "free_nats", "kl_scale", "expl_amount")
    require(args, "> 0", lambda v: v > 0, "model_lr", "intrinsic_scale", "actor_lr", "value_lr", "action_init_std",
            "action_mean_scale", "adam_eps", "grad_clip")
    require(args, "in [0, 1]", lambda v: 0 <= v <= 1, "lambda_")
    require(args, "in (0, 1]", lambda v: 0 < v <= 1, "gamma")


# Networks
def mlp(inp: int, out: int, layers: int, units: int) -> nn.Sequential:
    """`layers` ELU layers of `units`, then a linear output."""
    mods, size = [], inp
    for _ in range(layers):
        mods += [nn.Linear(size, units), nn.ELU()]
        size = units
    return nn.Sequential(*mods, nn.Linear(size, out))


class ConvEncoder(nn.Module):
    """Four conv layers (kernel 4, stride 2, depth d·2^i, ReLU): 64x64 -> 2x2x8d, flattened (1024 for d 32)."""

    def __init__(self, channels: int, depth: int):
        super().__init__()
        layers, c = [], channels
        for i in range(4):
            layers += [nn.Conv2d(c, depth * 2**i, 4, 2), nn.ReLU()]
            c = depth * 2**i
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_dim = 32 * depth

    def forward(self, obs):  # (N, C, 64, 64) in [-0.5, 0.5]
        return self.net(obs.contiguous(memory_format=torch.channels_last))  # faster CPU convs, same result


class ConvDecoder(nn.Module):
    """Linear to 32d, then transposed convs (kernels 5, 5, 6, 6, stride 2, ReLU): 1 -> 5 -> 13 -> 30 -> 64."""

    def __init__(self, feat: int, channels: int, depth: int):
        super().__init__()
        self.depth = depth
        self.inp = nn.Linear(feat, 32 * depth)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32 * depth, 4 * depth, 5, 2), nn.ReLU(),
            nn.ConvTranspose2d(4 * depth, 2 * depth, 5, 2), nn.ReLU(),
            nn.ConvTranspose2d(2 * depth, depth, 6, 2), nn.ReLU(),
            nn.ConvTranspose2d(depth, channels, 6, 2),
        )

    def forward(self, feat):  # (N, feat) -> image mean (N, C, 64, 64)
        # The first transposed conv sees a 1x1 map, where it is exactly a dense layer: computed as one matmul
        # with its own weights (same result; PyTorch's CPU conv-transpose kernel is ~10x slower on this shape).
        first = self.net[0]
        x = self.inp(feat) @ first.weight.flatten(1)  # (N, 32d) @ (32d, C'·5·5)
        x = x.view(-1, first.out_channels, 5, 5) + first.bias.view(1, -1, 1, 1)
        return self.net[1:](x.contiguous(memory_format=torch.channels_last))


class GRUCell(nn.Module):
    """GRU, computed exactly as torch.nn.GRUCell (and Keras' GRUCell with reset_after) but from two Linear
    layers, so that bf16 autocast applies to it on a CPU too (nn.GRUCell stays fp32 there):

        r, z = σ(W_ir x + W_hr h),  σ(W_iz x + W_hz h);   n = tanh(W_in x + r ⊙ (W_hn h));   h' = (1 − z) ⊙ n + z ⊙ h
    """

    def __init__(self, inp: int, size: int):
        super().__init__()
        self.inp = nn.Linear(inp, 3 * size)
        self.hid = nn.Linear(size, 3 * size)

    def forward(self, x, h):
        ir, iz, in_ = self.inp(x).chunk(3, -1)
        hr, hz, hn = self.hid(h).chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return ((1 - z) * n + z * h).to(h.dtype)


class RSSM(nn.Module):
    """Recurrent state-space model (Eq. 2 of the paper, PlaNet's RSSM). State: deter h_t (GRU), Gaussian stoch s_t.

        deterministic  h_t = f(h_{t-1}, s_{t-1}, a_{t-1})
        prior          s_t ~ p(s_t | h_t) = N(μ, σ)          (img_step, the transition model)
        posterior      s_t ~ q(s_t | h_t, o_t) = N(μ, σ)     (obs_step, the representation model)
    σ = softplus(·) + min_std. The sampled s_t is reparameterised, so gradients pass through imagination.
    """

    def __init__(self, action_dim: int, embed: int, deter: int, stoch: int, hidden: int, min_std: float):
        super().__init__()
        self.deter, self.stoch, self.min_std = deter, stoch, min_std
        self.img_in = nn.Sequential(nn.Linear(stoch + action_dim, hidden), nn.ELU())
        self.cell = GRUCell(hidden, deter)
        self.img_out = nn.Sequential(nn.Linear(deter, hidden), nn.ELU(), nn.Linear(hidden, 2 * stoch))
        self.obs_out = nn.Sequential(nn.Linear(deter + embed, hidden), nn.ELU(), nn.Linear(hidden, 2 * stoch))

    def initial(self, batch: int, device) -> dict:
        return dict(deter=torch.zeros(batch, self.deter, device=device), stoch=torch.zeros(batch, self.stoch, device=device))

    def _gaussian(self, deter, out) -> dict:
        mean, std = out.float().chunk(2, -1)
        std = F.softplus(std) + self.min_std
        return dict(deter=deter, stoch=mean + std * torch.randn_like(std), mean=mean, std=std)

    def img_step(self, state: dict, action) -> dict:
        deter = self.cell(self.img_in(torch.cat([state["stoch"], action], -1)), state["deter"])
        return self._gaussian(deter, self.img_out(deter))

    def obs_step(self, prior: dict, embed) -> dict:
        return self._gaussian(prior["deter"], self.obs_out(torch.cat([prior["deter"], embed], -1)))

    def observe(self, embed, action, is_first, state: dict | None = None):
        """Filter a batch of sequences. embed (B, T, E), action (B, T, A), is_first (B, T).

        Alignment (common/replay.py): action[t] is the action that led to o_t, so
            t          :  0     1     2
            o_t        :  o0    o1    o2
            action[t]  :  -     a0    a1        (zeros where is_first)
            h_t        :  f(h_{t-1}, s_{t-1}, action[t]);  s_t ~ q(· | h_t, o_t)
        Where is_first[t] the previous state and action are zeroed, so every episode starts afresh.
        Returns post and prior dicts of (B, T, ...) tensors.
        """
        B, T = action.shape[:2]
        state = state or self.initial(B, action.device)
        posts, priors = [], []
        for t in range(T):
            keep = (1.0 - is_first[:, t].float()).unsqueeze(-1)
            state = dict(deter=state["deter"] * keep, stoch=state["stoch"] * keep)
            prior = self.img_step(state, action[:, t] * keep)
            state = self.obs_step(prior, embed[:, t])
            posts.append(state)
            priors.append(prior)
        stack = lambda states: {k: torch.stack([s[k] for s in states], 1) for k in states[0]}  # noqa: E731
        return stack(posts), stack(priors)


def feature(state: dict):
    """The model state fed to every head: [s_t, h_t]."""
    return torch.cat([state["stoch"], state["deter"]], -1)


class WorldModel(nn.Module):
    """Representation (encoder + RSSM), observation p(o_t | s_t) and reward p(r_t | s_t) (the task's reward head)."""

    def __init__(self, obs_space: gym.Space, action_dim: int, args: Args):
        super().__init__()
        self.image = is_image_space(obs_space)  # uint8 frames, scaled to [-0.5, 0.5]
        self.conv = self.image and obs_space.shape[1:] == (64, 64)  # the conv stack needs 64x64
        size = int(np.prod(obs_space.shape))
        if self.conv:
            self.encoder = ConvEncoder(obs_space.shape[0], args.cnn_depth)
            self.embed_dim = self.encoder.out_dim
        else:
            self.encoder = nn.Sequential(mlp(size, args.units, 1, args.units), nn.ELU())
            self.embed_dim = args.units
        self.rssm = RSSM(action_dim, self.embed_dim, args.deter, args.stoch, args.hidden, args.min_std)
        self.feat_dim = args.deter + args.stoch
        self.decoder = ConvDecoder(self.feat_dim, obs_space.shape[0], args.cnn_depth) if self.conv else \
            mlp(self.feat_dim, size, 2, args.units)
        self.reward = mlp(self.feat_dim, 1, 2, args.units)

    def preprocess(self, obs):
        """uint8 frames -> [-0.5, 0.5] (flattened unless 64x64); vectors unchanged."""
        if not self.image:
            return obs.float()
        x = obs.float() / 255.0 - 0.5
        return x if self.conv else x.flatten(-3)

    def embed(self, obs):  # (B, T, ...) -> (B, T, E)
        B, T = obs.shape[:2]
        return self.encoder(self.preprocess(obs).flatten(0, 1)).view(B, T, -1)

    def decode(self, feat):  # (B, T, F) -> (B, T, *obs_shape), the mean of p(o | s)
        B, T = feat.shape[:2]
        out = self.decoder(feat.flatten(0, 1))
        return out.view(B, T, *out.shape[1:])


class Ensemble(nn.Module):
    """K one-step models (official one_step_model), all evaluated in one batched matmul per layer: each maps
    (s_t, a_t) → the predicted embedding of o_{t+1}, through two ReLU layers of `units` units with the
    action concatenated to the input of every layer."""

    def __init__(self, k: int, feat: int, action_dim: int, out: int, units: int):
        super().__init__()
        sizes = [(feat + action_dim, units), (units + action_dim, units), (units + action_dim, out)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in sizes:  # the default nn.Linear initialisation, one draw per member
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(k, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(k, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, feat, action):
        """feat (N, F), action (N, A) → predicted means (K, N, out)."""
        k, n = self.weights[0].shape[0], feat.shape[0]
        # first layer: every member reads the same input, so all K are one (N, F+A) @ (F+A, K·units) matmul
        w0 = self.weights[0].permute(1, 0, 2).reshape(self.weights[0].shape[1], -1)
        x = (torch.cat([feat, action], -1) @ w0).view(n, k, -1).transpose(0, 1) + self.biases[0]
        a = action.unsqueeze(0).expand(k, -1, -1)
        for w, b in zip(self.weights[1:], self.biases[1:]):
            x = torch.baddbmm(b, torch.cat([F.relu(x), a.to(x.dtype)], -1), w)
        return x


class TanhNormal:
    """tanh(N(mean, std)) per dimension, the action model's distribution for continuous actions."""

    def __init__(self, mean, std):
        self.normal = torch.distributions.Normal(mean, std)

    def rsample(self):
        return torch.tanh(self.normal.rsample())

    sample = rsample

    @property
    def mode(self):
        return torch.tanh(self.normal.mean)


class Actor(nn.Module):
    """Action model q_φ(a_τ | s_τ) (Dreamer): 4 ELU layers, tanh-Gaussian. Used twice: exploration and task."""

    def __init__(self, feat: int, action_dim: int, units: int, init_std: float, mean_scale: float):
        super().__init__()
        self.mean_scale = mean_scale
        self.raw_init_std = math.log(math.exp(init_std) - 1)  # softplus⁻¹(init_std)
        self.net = mlp(feat, 2 * action_dim, 4, units)

    def forward(self, feat):
        mean, std = self.net(feat).float().chunk(2, -1)
        mean = self.mean_scale * torch.tanh(mean / self.mean_scale)
        std = F.softplus(std + self.raw_init_std) + 1e-4
        return TanhNormal(mean, std)


# Losses and targets
def kl_gaussian(mean_q, std_q, mean_p, std_p):
    """KL(N(mean_q, std_q) ‖ N(mean_p, std_p)) of diagonal Gaussians, summed over the last dimension."""
    var_ratio = (std_q / std_p) ** 2
    return 0.5 * (var_ratio + ((mean_q - mean_p) / std_p) ** 2 - 1 - torch.log(var_ratio)).sum(-1)


def lambda_return(reward, value, discount, lambda_: float):
    """Eq. 6, V_λ, written recursively; all inputs (H, N) over the imagined states s_1 … s_H:

        V_λ(s_τ) = r̂_τ + γ̂_τ · ((1 − λ) · v(s_{τ+1}) + λ · V_λ(s_{τ+1}))   for τ < H,     V_λ(s_H) = v(s_H)

        τ          :  1     2   …   H-1    H
        reward     :  r̂_1   r̂_2      r̂_H-1  (r̂_H unused)        r̂_τ = E[r | s_τ], the reward that came with s_τ
        discount   :  γ̂_1   γ̂_2      γ̂_H-1  (γ̂_H unused)        γ̂_τ = γ · P(s_τ continues)
        value      :  v_1   v_2      v_H-1  v_H   (v_1 unused; v_H bootstraps)
        returns    :  V_1   V_2      V_H-1

    Unrolled, this equals the paper's Eq. 6 mixture (1 − λ) Σ_n λ^{n−1} V_N^n + λ^{H−1} V_N^H of the k-step
    estimates V_N^k(s_τ) = Σ_{n=τ}^{h−1} γ^{n−τ} r_n + γ^{h−τ} v(s_h). Returns (H-1, N).
    """
    next_return = value[-1]
    returns = []
    for t in reversed(range(reward.shape[0] - 1)):
        next_return = reward[t] + discount[t] * ((1 - lambda_) * value[t + 1] + lambda_ * next_return)
        returns.append(next_return)
    return torch.stack(returns[::-1])


def disagreement(means):
    """Eq. 5: D = (1/d) Σ_j Var_k[μ_k,j], the variance over the K ensemble means (1/(K−1)), averaged over the
    d dimensions of the predicted embedding. means (K, N, d) → (N,).
    Written out rather than as Tensor.var(0): a reduction over the leading axis of K was several times slower on
    a CPU (forward and backward), and this runs on every imagined transition of every update."""
    means = means.float()
    dev = means - means.mean(0)
    return (dev * dev).sum((0, 2)) / ((means.shape[0] - 1) * means.shape[2])


def ensemble_loss(ensemble: Ensemble, feat, embed, action, is_first):
    """Each member regresses the next embedding: ½‖μ_k(sg s_t, a_t) − sg e_{t+1}‖², averaged over members and
    transitions. Replay alignment (common/replay.py): the action taken at o_t is stored in row t + 1, so

        t          :  0      1      2
        state      :  s_0    s_1    s_2         input s_t = posterior feature of row t (gradient stopped)
        action[t]  :  -      a_0    a_1         input a_t = action[t + 1]
        target     :  e_1    e_2    -           e_{t+1} = embedding of o_{t+1} (gradient stopped)
    A transition is dropped where row t + 1 starts a new episode. feat (B, T, F), embed (B, T, E)."""
    inp, act, target = feat[:, :-1].detach(), action[:, 1:], embed[:, 1:].detach()
    keep = (~is_first[:, 1:]).float().flatten()
    pred = ensemble(inp.flatten(0, 1), act.flatten(0, 1))  # (K, N, E)
    err = 0.5 * (pred.float() - target.flatten(0, 1).float()).pow(2).sum(-1)  # (K, N)
    return (err * keep).sum(1).mean() / keep.sum().clamp_min(1)


def actor_loss(returns):
    """Dreamer's Eq. 7: max_φ E[Σ_τ V_λ(s_τ)] through the dynamics, written as the loss −E[V_λ(s_τ)]."""
    return -returns.mean()


def value_loss(value, returns):
    """Dreamer's Eq. 8: min_ψ E[½ ‖v_ψ(s_τ) − sg(V_λ(s_τ))‖²]."""
    return (0.5 * (value - returns.detach()) ** 2).mean()


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Dreamer's model loss: image NLL + β · max(mean KL, free nats), plus the reward head's NLL on features
    whose gradient is stopped (the representation is shaped by observations only: task-agnostic). Targets share
    the index of the posterior they are read from: o_t and r_t (the reward that came with o_t).
    Returns loss, posterior states, embeddings, metrics."""
    embed = wm.embed(batch["obs"])
    post, prior = wm.rssm.observe(embed, batch["action"], batch["is_first"])
    feat = feature(post)
    image_nll = 0.5 * (wm.decode(feat).float() - wm.preprocess(batch["obs"])).pow(2).flatten(2).sum(-1).mean()
    reward_nll = 0.5 * (wm.reward(feat.detach()).squeeze(-1).float() - batch["reward"]).pow(2).mean()
    kl = kl_gaussian(post["mean"], post["std"], prior["mean"], prior["std"]).mean()
    loss = image_nll + reward_nll + args.kl_scale * kl.clamp_min(args.free_nats)
    return loss, post, embed, dict(image_loss=image_nll, reward_loss=reward_nll, kl=kl, model_loss=loss)


@contextmanager
def frozen(*modules):
    """Parameters of `modules` require no gradient inside the block (the world model while the actor learns)."""
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def imagine(wm: WorldModel, actor: Actor, start: dict, horizon: int):
    """Roll the transition model H steps from the start states with an action model:

        τ        :  0      1      …   H
        state    :  s_0    s_1        s_H       s_0 = a posterior of the batch
        action   :  a_0    a_1        -         a_τ ~ q_φ(· | s_τ),  s_{τ+1} = img_step(s_τ, a_τ)
    Returns feats of s_0 … s_H (H+1, N, F) and actions a_0 … a_{H-1} (H, N, A), with gradients."""
    state = {k: start[k] for k in ("deter", "stoch")}
    feats, actions = [feature(state)], []
    for _ in range(horizon):
        actions.append(actor(feats[-1].detach()).rsample())
        state = wm.rssm.img_step(state, actions[-1])
        feats.append(feature(state))
    return torch.stack(feats), torch.stack(actions)


def intrinsic_reward(ensemble: Ensemble, feats, actions):
    """The exploration reward that comes with each imagined state s_τ, τ = 1 … H: the disagreement about the
    transition that led to it, D(s_{τ−1}, a_{τ−1}). feats (H+1, N, F), actions (H, N, A) → (H, N)."""
    H, N = actions.shape[:2]
    means = ensemble(feats[:-1].flatten(0, 1), actions.flatten(0, 1))
    return disagreement(means).view(H, N)


def task_reward(wm: WorldModel, feats, actions):
    """The task reward that comes with each imagined state s_τ, τ = 1 … H: the reward head's r̂(s_τ) (the reward
    returned together with an observation is predicted from its own state, as in world_model_loss).
    feats (H+1, N, F) → (H, N); the actions are not needed."""
    return wm.reward(feats[1:]).squeeze(-1).float()


class RunningMagnitude:
    """A running mean of |x| (momentum 0.99) that rewards are divided by when --normalize-intrinsic is on."""

    def __init__(self, momentum: float = 0.99):
        self.momentum, self.mag = momentum, None

    def __call__(self, x):
        m = x.detach().abs().mean()
        self.mag = m if self.mag is None else self.momentum * self.mag + (1 - self.momentum) * m
        return x / (self.mag + 1e-8)


def behaviour_losses(wm: WorldModel, actor: Actor, value_net, start: dict, reward_fn, args: Args):
    """One actor-critic in imagination: H steps from every start state, rewards r̂_τ for s_1 … s_H from
    `reward_fn(feats, actions)`, V_λ (Dreamer's Eq. 6) with a constant γ, the actor loss through the dynamics
    and the value regression on detached states. Returns actor loss, value loss, metrics."""
    with frozen(wm, value_net):  # the actor's gradient passes through these, but they are not updated by it
        feats, actions = imagine(wm, actor, start, args.horizon)
        reward = reward_fn(feats, actions)  # (H, N): reward[τ−1] came with s_τ
        value = value_net(feats[1:]).squeeze(-1).float()  # v(s_1) … v(s_H)
    returns = lambda_return(reward, value, torch.full_like(reward, args.gamma), args.lambda_)  # V_λ(s_1 … s_{H−1})
    loss_actor = actor_loss(returns)
    loss_value = value_loss(value_net(feats[1:-1].detach()).squeeze(-1).float(), returns)
    return loss_actor, loss_value, dict(imag_return=returns.mean(), imag_reward=reward.mean())


def optimizer_step(opt, loss, module, clip: float):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(module.parameters(), clip)
    opt.step()
    return norm


def train_update(nets: dict, opts: dict, batch: dict, args: Args, updates: int, save, norm: RunningMagnitude,
                 explore: bool = True):
    """One update (the paper's training step): the world model and reward head, the ensemble, the exploration
    actor-critic on the intrinsic reward (skipped when `explore` is False, in the few-shot phase) and the task
    actor-critic on the reward head, all from the same batch's posteriors."""
    wm, ensemble = nets["wm"], nets["ensemble"]
    autocast = torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with autocast:
        model_loss, post, embed, metrics = world_model_loss(wm, batch, args)
        loss_ens = ensemble_loss(ensemble, feature(post), embed, batch["action"], batch["is_first"])
    check_finite({"model_loss": model_loss, "ensemble_loss": loss_ens}, updates, save)
    optimizer_step(opts["wm"], model_loss, wm, args.grad_clip)
    optimizer_step(opts["ensemble"], loss_ens, ensemble, args.grad_clip)
    metrics["ensemble_loss"] = loss_ens
    start = {k: v.detach().flatten(0, 1) for k, v in post.items()}
    behaviours = [("task", lambda feats, actions: task_reward(wm, feats, actions))]
    if explore:
        def explore_reward(feats, actions):
            r = intrinsic_reward(ensemble, feats, actions)
            return norm(r) if args.normalize_intrinsic else args.intrinsic_scale * r
        behaviours.append(("expl", explore_reward))
    for name, reward_fn in behaviours:
        with autocast, frozen(ensemble):
            loss_actor, loss_value, m = behaviour_losses(wm, nets[f"{name}_actor"], nets[f"{name}_value"], start,
                                                         reward_fn, args)
        check_finite({f"{name}_actor_loss": loss_actor, f"{name}_value_loss": loss_value}, updates, save)
        optimizer_step(opts[f"{name}_actor"], loss_actor, nets[f"{name}_actor"], args.grad_clip)
        optimizer_step(opts[f"{name}_value"], loss_value, nets[f"{name}_value"], args.grad_clip)
        metrics.update({f"{name}_actor_loss": loss_actor, f"{name}_value_loss": loss_value,
                        **{f"{name}_{k}": v for k, v in m.items()}})
    return {k: v.detach() for k, v in metrics.items()}


def task_update(nets: dict, opts: dict, batch: dict, args: Args, updates: int, save):
    """Zero-shot phase: no new data and no world-model change; the reward head regresses the stored task
    rewards and the task actor-critic learns in imagination from the batch's posteriors."""
    wm = nets["wm"]
    with torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16):
        with torch.no_grad():
            post, _ = wm.rssm.observe(wm.embed(batch["obs"]), batch["action"], batch["is_first"])
        reward_nll = 0.5 * (wm.reward(feature(post)).squeeze(-1).float() - batch["reward"]).pow(2).mean()
    check_finite({"reward_loss": reward_nll}, updates, save)
    optimizer_step(opts["wm"], reward_nll, wm.reward, args.grad_clip)  # only the reward head has gradients
    start = {k: v.flatten(0, 1) for k, v in post.items()}
    with torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16):
        loss_actor, loss_value, m = behaviour_losses(wm, nets["task_actor"], nets["task_value"], start,
                                                     lambda feats, actions: task_reward(wm, feats, actions), args)
    check_finite({"task_actor_loss": loss_actor, "task_value_loss": loss_value}, updates, save)
    optimizer_step(opts["task_actor"], loss_actor, nets["task_actor"], args.grad_clip)
    optimizer_step(opts["task_value"], loss_value, nets["task_value"], args.grad_clip)
    return {"reward_loss": reward_nll.detach(), "task_actor_loss": loss_actor.detach(),
            "task_value_loss": loss_value.detach(), **{f"task_{k}": v.detach() for k, v in m.items()}}


# Acting
class Agent:
    """Online filter for acting with one of the two action models: keeps (state, previous action) across env
    steps, resets at is_first."""

    def __init__(self, wm: WorldModel, action_dim: int, device):
        self.wm, self.action_dim, self.device = wm, action_dim, device
        self.state, self.prev_action = None, None

    @torch.no_grad()
    def act(self, actor: Actor, obs, is_first: bool, greedy: bool, expl_amount: float = 0.0):
        if is_first or self.state is None:
            self.state = self.wm.rssm.initial(1, self.device)
            self.prev_action = torch.zeros(1, self.action_dim, device=self.device)
        obs = torch.as_tensor(obs, device=self.device)[None, None]
        prior = self.wm.rssm.img_step(self.state, self.prev_action)
        self.state = self.wm.rssm.obs_step(prior, self.wm.embed(obs)[:, 0])
        policy = actor(feature(self.state))
        action = policy.mode if greedy else policy.sample()
        if expl_amount > 0:
            action = (action + expl_amount * torch.randn_like(action)).clamp(-1, 1)
        self.prev_action = action.float()
        return action[0].float().cpu().numpy()


def evaluate(agent: Agent, actor: Actor, args: Args, episodes: int) -> list[float]:
    """Greedy episodes of `actor` in a fresh env (no data kept); returns their raw returns."""
    env = make_env(args.env_id, args.seed + 10_000, pixels=args.pixels, action_repeat=args.action_repeat)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=args.seed + 10_000 + ep)
        is_first, done, total = True, False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(actor, obs, is_first, greedy=True))
            total += float(reward)
            is_first, done = False, terminated or truncated
        returns.append(total)
    env.close()
    return returns


@torch.no_grad()
def openloop_video(wm: WorldModel, batch: dict, context: int = 5):
    """Observe `context` real frames, then imagine the rest with the real actions; returns a uint8 video
    (T, 3, 3H, N·W): truth on top, the model in the middle, the error below, N sequences side by side."""
    n = min(6, batch["obs"].shape[0])
    obs, action, is_first = batch["obs"][:n], batch["action"][:n], batch["is_first"][:n]
    post, _ = wm.rssm.observe(wm.embed(obs[:, :context]), action[:, :context], is_first[:, :context])
    recon = wm.decode(feature(post))
    state = {k: post[k][:, -1] for k in ("deter", "stoch")}
    feats = []
    for t in range(context, obs.shape[1]):
        state = wm.rssm.img_step(state, action[:, t])
        feats.append(feature(state))
    model = torch.cat([recon, wm.decode(torch.stack(feats, 1))], 1).float().view(obs.shape) + 0.5
    truth = obs.float() / 255.0
    if not wm.conv:  # small frames (MinAtar): enlarge 6x for viewing
        model, truth = (x.repeat_interleave(6, -1).repeat_interleave(6, -2) for x in (model, truth))
    error = (model - truth + 1) / 2
    video = torch.cat([truth, model, error], 3).clamp(0, 1)  # (n, T, C, 3H, W)
    video = torch.cat(list(video), -1)  # (T, C, 3H, n·W)
    if video.shape[1] != 3:
        video = video.max(1, keepdim=True).values.expand(-1, 3, -1, -1)  # grayscale or MinAtar's object channels
    return (video * 255).to(torch.uint8).cpu()


# Training loop: exploration, zero-shot adaptation, few-shot adaptation
def main(args: Args):
    check_args(args)
    if args.action_repeat == 0:
        args.action_repeat = default_action_repeat(args.env_id)
    env_kwargs = dict(pixels=args.pixels, action_repeat=args.action_repeat)
    try:  # a bad env id or space stops here, before a run directory is made
        env = make_env(args.env_id, args.seed, **env_kwargs)
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ValueError(f"'{args.env_id}' has discrete actions; this Plan2Explore is for continuous control "
                             f"(the paper's DMC tasks).")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    action_dim = env.action_space.shape[0]
    run_dir, resumed = open_run(args)
    if args.capture_video:
        env.close()
        env = make_env(args.env_id, args.seed, **env_kwargs, capture_video=True, video_dir=os.path.join(run_dir, "videos"))
    seed_everything(args.seed, args.torch_deterministic)
    device = choose_device(args.cuda)

    wm = WorldModel(env.observation_space, action_dim, args).to(device)
    nets = dict(wm=wm, ensemble=Ensemble(args.ensemble_size, wm.feat_dim, action_dim, wm.embed_dim,
                                         args.ensemble_units or wm.embed_dim))
    for name in ("expl", "task"):
        nets[f"{name}_actor"] = Actor(wm.feat_dim, action_dim, args.units, args.action_init_std, args.action_mean_scale)
        nets[f"{name}_value"] = mlp(wm.feat_dim, 1, 3, args.units)
    nets = {k: v.to(device) for k, v in nets.items()}
    lrs = dict(wm=args.model_lr, ensemble=args.model_lr, expl_actor=args.actor_lr, task_actor=args.actor_lr,
               expl_value=args.value_lr, task_value=args.value_lr)
    opts = {k: torch.optim.Adam(nets[k].parameters(), lr, eps=args.adam_eps) for k, lr in lrs.items()}
    replay = Replay(args.replay_capacity, os.path.join(run_dir, "episodes"), seed=args.seed)
    norm = RunningMagnitude()

    counters = dict(global_step=0, updates=0, task_done=0, last_return=None, zero_shot=None, few_shot=None)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resumed:
        ckpt = load_checkpoint(ckpt_path, device, **nets, **{f"{k}_opt": opt for k, opt in opts.items()})
        counters.update(ckpt["counters"])
        norm.mag = ckpt["intrinsic_magnitude"]
        rows = replay.load()
        replay.rng.bit_generator.state = ckpt["replay_rng"]
        print(f"resumed {run_dir} at step {counters['global_step']}, update {counters['updates']}; "
              f"{rows} replay rows reloaded")
    writer = make_writer(run_dir, args, resumed)
    print(f"run: {run_dir}  preset: {args.preset}  obs {env.observation_space.shape}  actions {action_dim}  "
          f"ensemble {args.ensemble_size} × embedding {wm.embed_dim}")

    def save():
        replay.save_partial()
        if args.save_model:
            save_checkpoint(ckpt_path, {**{k: v.state_dict() for k, v in nets.items()},
                                        **{f"{k}_opt": v.state_dict() for k, v in opts.items()},
                                        "counters": counters, "global_step": counters["global_step"],
                                        "updates": counters["updates"], "intrinsic_magnitude": norm.mag,
                                        "replay_rng": replay.rng.bit_generator.state, "args": vars(args)})
        return ckpt_path

    stop = []  # SIGTERM / Ctrl-C set this; the loop stops between steps, never inside an update
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    metrics_log: dict[str, list] = {}

    def log_metrics(metrics: dict, t0: float):
        counters["updates"] += 1
        for k, v in metrics.items():
            metrics_log.setdefault(k, []).append(v)  # a device tensor, read when logged
        metrics_log.setdefault("train_step_ms", []).append(1000 * (time.perf_counter() - t0))
        if args.save_model and counters["updates"] % args.checkpoint_every == 0:
            save()

    def sample_batch():
        data = replay.sample(args.batch_size, args.batch_length)
        return to_device(data, device)

    def update(explore: bool):
        t0 = time.perf_counter()
        batch = sample_batch()
        metrics = train_update(nets, opts, batch, args, counters["updates"], save, norm, explore)
        log_metrics(metrics, t0)
        if args.video_every and counters["updates"] % args.video_every == 0 and wm.image:
            add_video(writer, "media/openloop", openloop_video(wm, batch), counters["global_step"])

    def flush_logs():
        step = counters["global_step"]
        for k, v in metrics_log.items():
            tag = "perf" if k.endswith("_ms") else "world_model" if k in ("kl", "image_loss", "reward_loss") else "losses"
            writer.add_scalar(f"{tag}/{k}", mean(v), step)
        metrics_log.clear()

    agent = Agent(wm, action_dim, device)
    explore_end, adapt_end = args.total_timesteps, args.total_timesteps + args.adapt_steps
    progress = Progress(adapt_end, counters["global_step"],
                        "prefill" if counters["updates"] == 0 else "exploration" if counters["global_step"] < explore_end
                        else "few-shot")
    zero_action = np.zeros(action_dim, np.float32)
    env_state = {"obs": None, "is_first": True}

    def collect(until: int, actor: Actor, explore: bool):
        """Act with `actor` (random during the prefill) until `until` env steps, training every train_every."""
        next_log = (counters["global_step"] // args.log_every + 1) * args.log_every
        next_train = max(args.prefill, (counters["global_step"] // args.train_every + 1) * args.train_every)
        if env_state["obs"] is None:
            env_state["obs"], _ = env.reset(seed=args.seed + counters["global_step"])
            env_state["is_first"] = True
            replay.add(obs=env_state["obs"], action=zero_action, reward=0.0, terminated=False, truncated=False,
                       is_first=True)
        phase = "exploration" if explore else "few-shot"
        if counters["updates"] > 0 and progress.phase != phase:
            progress.start_phase(phase, counters["global_step"])
        while counters["global_step"] < until:
            if counters["global_step"] >= next_train:
                if counters["updates"] == 0:
                    progress.start_phase(phase, counters["global_step"])
                for _ in range(args.pretrain if counters["updates"] == 0 else args.train_steps):
                    if stop:
                        raise KeyboardInterrupt
                    update(explore)
                next_train += args.train_every
            if stop:
                raise KeyboardInterrupt
            if counters["global_step"] < args.prefill:
                action = env.action_space.sample().astype(np.float32)
                agent.state = None
            else:
                action = agent.act(actor, env_state["obs"], env_state["is_first"], greedy=False,
                                   expl_amount=args.expl_amount)
            obs, reward, terminated, truncated, info = env.step(action)
            counters["global_step"] += args.action_repeat
            replay.add(obs=obs, action=action, reward=reward, terminated=terminated, truncated=truncated, is_first=False)
            env_state["obs"], env_state["is_first"] = obs, False
            if "episode" in info:
                counters["last_return"] = float(info["episode"]["r"])
                writer.add_scalar("charts/episodic_return", counters["last_return"], counters["global_step"])
                writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]) * args.action_repeat,
                                  counters["global_step"])
            if terminated or truncated:
                env_state["obs"], _ = env.reset()
                env_state["is_first"] = True
                replay.add(obs=env_state["obs"], action=zero_action, reward=0.0, terminated=False, truncated=False,
                           is_first=True)
            if counters["global_step"] >= next_log:
                next_log += args.log_every
                flush_logs()
                writer.add_scalar("charts/SPS", progress.sps(counters["global_step"]), counters["global_step"])
                print(progress.line(counters["global_step"], counters["last_return"]), f"updates {counters['updates']}",
                      flush=True)

    def run_eval(key: str) -> None:
        returns = evaluate(Agent(wm, action_dim, device), nets["task_actor"], args, args.eval_episodes)
        counters[key] = returns
        for r in returns:
            writer.add_scalar(f"eval/{key}_return", r, counters["global_step"])
            writer.add_scalar("eval/episodic_return", r, counters["global_step"])
        print(f"eval ({key.replace('_', '-')}): task policy {np.mean(returns):.1f} over {len(returns)} greedy episodes "
              f"after {counters['global_step']} env steps")
        save()

    try:
        # 1. task-agnostic exploration: the exploration policy collects every step
        collect(explore_end, nets["expl_actor"], explore=True)
        # 2. zero-shot: reward head and task actor-critic on the collected data, no environment step
        steps_before = counters["global_step"]
        while counters["task_done"] < args.task_updates:
            if stop:
                raise KeyboardInterrupt
            t0 = time.perf_counter()
            log_metrics(task_update(nets, opts, sample_batch(), args, counters["updates"], save), t0)
            counters["task_done"] += 1
        assert counters["global_step"] == steps_before  # the zero-shot phase takes no environment step
        flush_logs()
        if args.eval_episodes > 0 and counters["zero_shot"] is None:
            run_eval("zero_shot")
        # 3. few-shot: the task policy collects adapt_steps more env steps while everything keeps training
        if args.adapt_steps > 0:
            collect(adapt_end, nets["task_actor"], explore=False)
            if args.eval_episodes > 0 and counters["few_shot"] is None:
                run_eval("few_shot")
    except KeyboardInterrupt:
        print(f"interrupted at step {counters['global_step']}; saving checkpoint and the unfinished episode")
        save()
        writer.close()
        env.close()
        sys.exit(130)
    except BaseException:
        replay.save_partial()  # a crash keeps every collected step on disk
        raise
    save()
    writer.close()
    env.close()


if __name__ == "__main__":
    main(parse_args(Args, PRESETS, default_preset))
