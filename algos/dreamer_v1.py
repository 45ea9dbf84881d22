"""Dreamer: "Dream to Control: Learning Behaviors by Latent Imagination", Hafner, Lillicrap, Ba, Norouzi (2020),
arXiv 1912.01603.

PlaNet's recurrent state-space model (Gaussian stochastic state) is learned from replayed sequences; an
action model and a value model are then learned purely in imagination: 15-step rollouts of the prior from
every posterior state, V_λ targets (Eq. 6), the actor maximising V_λ by backpropagating analytic gradients
through the learned dynamics (Eq. 7), the value regressing V_λ (Eq. 8).

Run:  python algos/dreamer_v1.py --env-id dm_control/walker-walk-v0     (dmc preset, the paper's setting)
      python algos/dreamer_v1.py --env-id Pendulum-v1                   (small preset, CPU)
      python algos/dreamer_v1.py --env-id CartPole-v1                   (discrete actions: one-hot actor)
      python algos/dreamer_v1.py --resume runs/<run_name> --env-id ...   (continue a stopped run)
The preset is chosen from the env id (dmc for dm_control/, small otherwise) or with --preset; every flag
given explicitly wins over the preset.

Deviations from the paper / official code (danijar/dreamer):
 1. Log-likelihoods of unit-variance Gaussians (image, reward, value) are written as 0.5·squared error,
    dropping the constant; gradients are identical.
 2. Greedy evaluation takes tanh(mean) of the action model; the official code takes the most likely of
    100 samples of the tanh-Gaussian. (As in the paper, no loss has an entropy term.)
 3. With a discount (continuation) head, imagined trajectories that start from a terminal state are
    weighted 0 (the official code only drops the last step of each sequence as a start).
 4. The `small` preset (CPU) is ours, not the paper's: conv depth 16, MLPs of 200, batch 16 × 50, train
    every 500 env steps, a discount head, and no free nats, which is what learned Pendulum-v1 from vectors
    in 30 CPU minutes. On pixels keep the paper's `--free-nats 3`: without free nats the posterior
    collapsed onto the prior on cartpole-swingup pixels (measured with planet.py: KL 0.00 nats), and with 3
    the 30-minute cartpole-swingup check rose above random (benchmarks/RESULTS.md).
 5. Frames smaller than 64×64 (MinAtar's 10×10) are flattened and go through the MLP encoder/decoder.
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


# Hyperparameters (defaults: the paper's DeepMind Control setting, official dreamer.py define_config)
@dataclass
class Args:
    exp_name: str = "dreamer_v1"
    """name of this experiment (the file name)"""
    env_id: str = "dm_control/walker-walk-v0"
    """environment id (dm_control/*, ALE/*, MinAtar/*, CarRacing-v3 or any Box-observation gymnasium id)"""
    preset: str = "dmc"
    """dmc | small; chosen from the env id unless given; explicit flags win over it"""
    seed: int = 0
    """seed of python, numpy, torch and the environment"""
    total_timesteps: int = 5_000_000
    """environment steps (counting action repeat) to train for"""
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
    """greedy evaluation episodes at the end of training; 0: none"""
    log_every: int = 10_000
    """environment steps between progress lines and scalar logs"""
    video_every: int = 1_000
    """updates between open-loop videos (media/openloop); 0: none"""
    checkpoint_every: int = 1_000
    """updates between checkpoints"""

    # environment
    action_repeat: int = 0
    """environment steps per agent step; 0 = the env family's default (DMC 2 as in the paper, Atari 4, else 1)"""
    pixels: bool | None = None
    """dm_control: True images, False proprioceptive vectors; None = the env family's default"""

    # replay and schedule
    replay_capacity: int = 1_000_000
    """rows (agent steps) held in replay"""
    prefill: int = 5_000
    """environment steps of uniformly random actions before training (the seed episodes)"""
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

    # world model
    deter: int = 200
    """GRU state size h"""
    stoch: int = 30
    """Gaussian stochastic state size s"""
    hidden: int = 200
    """hidden units of the RSSM's input/output layers"""
    units: int = 400
    """units of every dense layer (reward, discount, value, action models, vector encoder/decoder)"""
    cnn_depth: int = 32
    """channels of the first conv layer (doubling each of the four layers)"""
    min_std: float = 0.1
    """minimum standard deviation of the prior and posterior"""
    free_nats: float = 3.0
    """free nats, applied to the mean KL as officially: max(mean KL, free_nats)"""
    kl_scale: float = 1.0
    """β, the KL loss scale"""
    pred_discount: bool = False
    """learn a discount (continuation) head, for envs that terminate; False uses the constant γ (DMC)"""
    discount_scale: float = 10.0
    """loss scale of the discount head"""
    model_lr: float = 6e-4
    """world model learning rate"""

    # behaviour
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
    """initial std of the tanh-Gaussian action model (softplus(x + c) = 5 at x = 0)"""
    action_mean_scale: float = 5.0
    """the pre-tanh mean is mean_scale · tanh(x / mean_scale)"""
    expl_amount: float = 0.3
    """exploration: std of additive Gaussian noise (continuous) or ε of ε-greedy (discrete)"""
    adam_eps: float = 1e-7
    """Adam epsilon (the official code keeps TensorFlow's default)"""
    grad_clip: float = 100.0
    """global gradient norm clip per optimizer"""


PRESETS = {
    "dmc": {},
    "small": dict(
        total_timesteps=100_000, prefill=2_500, train_every=500, batch_size=16, units=200, cnn_depth=16,
        free_nats=0.0, pred_discount=True, log_every=1_000, video_every=200, checkpoint_every=200, eval_episodes=5,
    ),
}


def default_preset(env_id: str) -> str:
    return "dmc" if env_family(env_id) == "dmc" else "small"


def check_args(args: Args) -> None:
    """Each numeric flag in its range, before a run directory is made or an env built (common/run.py require)."""
    require(args, "≥ 1", lambda v: v >= 1, "total_timesteps", "log_every", "checkpoint_every", "replay_capacity",
            "prefill", "pretrain", "train_every", "train_steps", "batch_size", "batch_length", "deter", "stoch",
            "hidden", "units", "cnn_depth", "horizon")
    require(args, "≥ 0 (0: off)", lambda v: v >= 0, "eval_episodes", "video_every")
    require(args, "≥ 0 (0: the env family's default)", lambda v: v >= 0, "action_repeat")
    require(args, "≥ 0", lambda v: v >= 0, "seed", "min_std", "free_nats", "kl_scale", "discount_scale", "expl_amount")
    require(args, "> 0", lambda v: v > 0, "model_lr", "actor_lr", "value_lr", "action_init_std", "action_mean_scale",
            "adam_eps", "grad_clip")
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
    """Representation (encoder + RSSM), observation p(o_t | s_t), reward p(r_t | s_t), discount p(γ_t | s_t)."""

    def __init__(self, obs_space: gym.Space, action_dim: int, args: Args):
        super().__init__()
        self.image = is_image_space(obs_space)  # uint8 frames, scaled to [-0.5, 0.5]
        self.conv = self.image and obs_space.shape[1:] == (64, 64)  # the paper's conv stack needs 64x64
        size = int(np.prod(obs_space.shape))  # vectors, or frames too small for it (MinAtar's 10x10) flattened
        if self.conv:
            self.encoder = ConvEncoder(obs_space.shape[0], args.cnn_depth)
            embed = self.encoder.out_dim
        else:
            self.encoder = nn.Sequential(mlp(size, args.units, 1, args.units), nn.ELU())
            embed = args.units
        self.rssm = RSSM(action_dim, embed, args.deter, args.stoch, args.hidden, args.min_std)
        self.feat_dim = args.deter + args.stoch
        self.decoder = ConvDecoder(self.feat_dim, obs_space.shape[0], args.cnn_depth) if self.conv else \
            mlp(self.feat_dim, size, 2, args.units)
        self.reward = mlp(self.feat_dim, 1, 2, args.units)
        self.discount = mlp(self.feat_dim, 1, 3, args.units)

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


class OneHotCategorical(torch.distributions.OneHotCategorical):
    """Categorical over one-hot actions; `rsample` is straight-through (forward: a sample, backward: the
    gradient of the probabilities), the paper's extension to discrete actions."""

    def rsample(self, sample_shape=torch.Size()):
        sample = self.sample(sample_shape)
        return sample + self.probs - self.probs.detach()

    @property
    def mode(self):
        return F.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).float()


class Actor(nn.Module):
    """Action model q_φ(a_τ | s_τ) (Sec. 3): 4 ELU layers; tanh-Gaussian or one-hot categorical."""

    def __init__(self, feat: int, action_dim: int, discrete: bool, units: int, init_std: float, mean_scale: float):
        super().__init__()
        self.discrete, self.mean_scale = discrete, mean_scale
        self.raw_init_std = math.log(math.exp(init_std) - 1)  # softplus⁻¹(init_std)
        self.net = mlp(feat, action_dim if discrete else 2 * action_dim, 4, units)

    def forward(self, feat):
        out = self.net(feat).float()
        if self.discrete:
            return OneHotCategorical(logits=out, validate_args=False)
        mean, std = out.chunk(2, -1)
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


def trajectory_weight(discount, start_continues):
    """Weight of each imagined state, the cumulative product of the predicted discounts before it (as the
    official code weights its losses), times whether the real start state continues (deviation 3):

        w_1 = c_0,   w_τ = c_0 · Π_{1≤i<τ} γ̂_i          discount (H, N), start_continues (N,) -> (H, N)
    """
    first = start_continues[None].to(discount.dtype)
    return torch.cumprod(torch.cat([first, discount[:-1]], 0), 0)


def actor_loss(returns, weight):
    """Eq. 7: max_φ E[Σ_τ V_λ(s_τ)], the gradient flowing through V_λ into the imagined states, the
    reparameterised actions and the action model. Written as a loss: −E[w_τ · V_λ(s_τ)]."""
    return -(weight.detach() * returns).mean()


def value_loss(value, returns, weight):
    """Eq. 8: min_ψ E[w_τ · ½ ‖v_ψ(s_τ) − sg(V_λ(s_τ))‖²]."""
    return (weight.detach() * 0.5 * (value - returns.detach()) ** 2).mean()


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Eq. 10 (negated): image, reward (and discount) negative log-likelihoods + β · max(mean KL, free nats).

    Targets share the index of the posterior they are read from (common/replay.py): o_t, r_t (the reward
    that came with o_t) and γ_t = γ · (1 − terminated_t). Returns loss, posterior states, metrics.
    """
    embed = wm.embed(batch["obs"])
    post, prior = wm.rssm.observe(embed, batch["action"], batch["is_first"])
    feat = feature(post)
    image_nll = 0.5 * (wm.decode(feat).float() - wm.preprocess(batch["obs"])).pow(2).flatten(2).sum(-1).mean()
    reward_nll = 0.5 * (wm.reward(feat).squeeze(-1).float() - batch["reward"]).pow(2).mean()
    kl = kl_gaussian(post["mean"], post["std"], prior["mean"], prior["std"]).mean()
    loss = image_nll + reward_nll + args.kl_scale * kl.clamp_min(args.free_nats)
    metrics = dict(image_loss=image_nll, reward_loss=reward_nll, kl=kl)
    if args.pred_discount:
        discount_target = args.gamma * (1.0 - batch["terminated"].float())
        discount_nll = F.binary_cross_entropy_with_logits(wm.discount(feat).squeeze(-1).float(), discount_target)
        loss = loss + args.discount_scale * discount_nll
        metrics["discount_loss"] = discount_nll
    metrics["model_loss"] = loss
    return loss, post, metrics


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
    """Roll the transition model forward H steps from the start states with the action model (Algorithm 1).

        τ        :  0      1      …   H
        state    :  s_0    s_1        s_H       s_0 = a posterior of the batch (not part of the output)
        action   :  a_0    a_1        -         a_τ ~ q_φ(· | s_τ),  s_{τ+1} = img_step(s_τ, a_τ)
    Gradients flow through the sampled states and the reparameterised actions. Returns feats (H, N, F).
    """
    state = {k: start[k] for k in ("deter", "stoch")}
    feats = []
    for _ in range(horizon):
        action = actor(feature(state).detach()).rsample()
        state = wm.rssm.img_step(state, action)
        feats.append(feature(state))
    return torch.stack(feats)


def behaviour_loss(wm: WorldModel, actor: Actor, value_net, post: dict, terminated, args: Args):
    """Action and value losses from H-step imagination starting at every posterior state of the batch."""
    start = {k: v.detach().flatten(0, 1) for k, v in post.items()}
    with frozen(wm, value_net):  # the actor's gradient passes through these, but they are not updated by it
        feats = imagine(wm, actor, start, args.horizon)
        reward = wm.reward(feats).squeeze(-1).float()
        if args.pred_discount:
            discount = torch.sigmoid(wm.discount(feats).squeeze(-1).float())  # the head predicts γ·continue
        else:
            discount = torch.full_like(reward, args.gamma)
        value = value_net(feats).squeeze(-1).float()
    returns = lambda_return(reward, value, discount, args.lambda_)  # (H-1, N): V_λ(s_1) … V_λ(s_{H-1})
    start_continues = 1.0 - terminated.flatten().float() if args.pred_discount else torch.ones_like(reward[0])
    weight = trajectory_weight(discount, start_continues)[:-1]
    loss_actor = actor_loss(returns, weight)
    loss_value = value_loss(value_net(feats[:-1].detach()).squeeze(-1).float(), returns, weight)
    metrics = dict(actor_loss=loss_actor, value_loss=loss_value, imag_return=returns.mean(), imag_reward=reward.mean())
    return loss_actor, loss_value, metrics


def optimizer_step(opt, loss, module, clip: float):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(module.parameters(), clip)
    opt.step()
    return norm


def train_update(wm, actor, value_net, opts, batch, args: Args, updates: int, save):
    """One update: the world model on a replayed batch, then the action and value models in imagination from
    its posteriors. `save` is called before stopping on a non-finite loss."""
    model_opt, actor_opt, value_opt = opts
    autocast = torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with autocast:
        model_loss, post, metrics = world_model_loss(wm, batch, args)
    check_finite({"model_loss": model_loss}, updates, save)
    optimizer_step(model_opt, model_loss, wm, args.grad_clip)
    with autocast:
        loss_actor, loss_value, ac_metrics = behaviour_loss(wm, actor, value_net, post, batch["terminated"], args)
    check_finite({"actor_loss": loss_actor, "value_loss": loss_value}, updates, save)
    optimizer_step(actor_opt, loss_actor, actor, args.grad_clip)
    optimizer_step(value_opt, loss_value, value_net, args.grad_clip)
    return {k: v.detach() for k, v in {**metrics, **ac_metrics}.items()}


# Acting
class Agent:
    """Online filter for acting: keeps (state, previous action) across env steps, resets at is_first."""

    def __init__(self, wm: WorldModel, actor: Actor, action_dim: int, device):
        self.wm, self.actor, self.action_dim, self.device = wm, actor, action_dim, device
        self.state, self.prev_action = None, None

    @torch.no_grad()
    def act(self, obs, is_first: bool, greedy: bool, expl_amount: float = 0.0):
        if is_first or self.state is None:
            self.state = self.wm.rssm.initial(1, self.device)
            self.prev_action = torch.zeros(1, self.action_dim, device=self.device)
        obs = torch.as_tensor(obs, device=self.device)[None, None]
        prior = self.wm.rssm.img_step(self.state, self.prev_action)
        self.state = self.wm.rssm.obs_step(prior, self.wm.embed(obs)[:, 0])
        policy = self.actor(feature(self.state))
        action = policy.mode if greedy else policy.sample()
        if expl_amount > 0 and self.actor.discrete:  # ε-greedy
            if torch.rand(()) < expl_amount:
                action = F.one_hot(torch.randint(self.action_dim, (1,), device=self.device), self.action_dim).float()
        elif expl_amount > 0:  # additive Gaussian noise
            action = (action + expl_amount * torch.randn_like(action)).clamp(-1, 1)
        self.prev_action = action.float()
        return action[0].float().cpu().numpy()


def env_action(action: np.ndarray, discrete: bool):
    """The model's action (one-hot or [-1, 1] vector) as the env expects it."""
    return int(action.argmax()) if discrete else action


def evaluate(agent: Agent, args: Args, episodes: int, discrete: bool) -> list[float]:
    """Greedy episodes in a fresh env; returns their raw returns."""
    env = make_env(args.env_id, args.seed + 10_000, pixels=args.pixels, action_repeat=args.action_repeat)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=args.seed + 10_000 + ep)
        is_first, done, total = True, False, 0.0
        while not done:
            action = agent.act(obs, is_first, greedy=True)
            obs, reward, terminated, truncated, _ = env.step(env_action(action, discrete))
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


# Training loop (Algorithm 1 of the paper)
def main(args: Args):
    check_args(args)
    if args.action_repeat == 0:
        args.action_repeat = default_action_repeat(args.env_id)
    env_kwargs = dict(pixels=args.pixels, action_repeat=args.action_repeat)
    try:  # a bad env id or space stops here, before a run directory is made
        env = make_env(args.env_id, args.seed, **env_kwargs)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    run_dir, resumed = open_run(args)
    if args.capture_video:
        env.close()
        env = make_env(args.env_id, args.seed, **env_kwargs, capture_video=True, video_dir=os.path.join(run_dir, "videos"))
    seed_everything(args.seed, args.torch_deterministic)
    device = choose_device(args.cuda)

    wm = WorldModel(env.observation_space, action_dim, args).to(device)
    actor = Actor(wm.feat_dim, action_dim, discrete, args.units, args.action_init_std, args.action_mean_scale).to(device)
    value_net = mlp(wm.feat_dim, 1, 3, args.units).to(device)
    model_opt = torch.optim.Adam(wm.parameters(), args.model_lr, eps=args.adam_eps)
    actor_opt = torch.optim.Adam(actor.parameters(), args.actor_lr, eps=args.adam_eps)
    value_opt = torch.optim.Adam(value_net.parameters(), args.value_lr, eps=args.adam_eps)
    opts = (model_opt, actor_opt, value_opt)
    replay = Replay(args.replay_capacity, os.path.join(run_dir, "episodes"), seed=args.seed)

    global_step, updates, last_return = 0, 0, None
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resumed:
        ckpt = load_checkpoint(ckpt_path, device, wm=wm, actor=actor, value=value_net, model_opt=model_opt,
                               actor_opt=actor_opt, value_opt=value_opt)
        global_step, updates, last_return = ckpt["global_step"], ckpt["updates"], ckpt.get("last_return")
        rows = replay.load()
        replay.rng.bit_generator.state = ckpt["replay_rng"]
        print(f"resumed {run_dir} at step {global_step}, update {updates}; {rows} replay rows reloaded")
    writer = make_writer(run_dir, args, resumed)
    print(f"run: {run_dir}  preset: {args.preset}  obs {env.observation_space.shape}  "
          f"{'discrete' if discrete else 'continuous'} actions ({action_dim})")

    def save():
        replay.save_partial()
        if args.save_model:
            save_checkpoint(ckpt_path, dict(
                wm=wm.state_dict(), actor=actor.state_dict(), value=value_net.state_dict(),
                model_opt=model_opt.state_dict(), actor_opt=actor_opt.state_dict(), value_opt=value_opt.state_dict(),
                global_step=global_step, updates=updates, last_return=last_return,
                replay_rng=replay.rng.bit_generator.state, args=vars(args)))
        return ckpt_path

    stop = []  # SIGTERM / Ctrl-C set this; the loop stops between steps, never inside an update
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))

    agent = Agent(wm, actor, action_dim, device)
    metrics_log: dict[str, list] = {}

    def update():
        nonlocal updates
        t0 = time.perf_counter()
        data = replay.sample(args.batch_size, args.batch_length)
        batch = to_device(data, device)
        metrics = train_update(wm, actor, value_net, opts, batch, args, updates, save)
        updates += 1
        for k, v in metrics.items():
            metrics_log.setdefault(k, []).append(v)  # a device tensor, read when logged
        metrics_log.setdefault("train_step_ms", []).append(1000 * (time.perf_counter() - t0))
        if args.video_every and updates % args.video_every == 0 and wm.image:
            add_video(writer, "media/openloop", openloop_video(wm, batch), global_step)
        if args.save_model and updates % args.checkpoint_every == 0:
            save()

    progress = Progress(args.total_timesteps, global_step, "prefill" if updates == 0 else "train")
    obs, _ = env.reset(seed=args.seed + global_step)
    is_first = True
    next_log = (global_step // args.log_every + 1) * args.log_every
    next_train = max(args.prefill, (global_step // args.train_every + 1) * args.train_every)
    zero_action = np.zeros(action_dim, np.float32)
    try:
        replay.add(obs=obs, action=zero_action, reward=0.0, terminated=False, truncated=False, is_first=True)
        while global_step < args.total_timesteps:
            # learn: once `pretrain` updates after the prefill, then `train_steps` every `train_every` env steps
            if global_step >= next_train:
                if updates == 0:
                    progress.start_phase("train", global_step)
                rounds = args.pretrain if updates == 0 else args.train_steps
                for _ in range(rounds):
                    if stop:
                        break
                    update()
                next_train += args.train_every
            if stop:
                raise KeyboardInterrupt

            # act: random during the prefill, else the action model plus exploration noise
            if global_step < args.prefill:
                sample = env.action_space.sample()
                action = np.eye(action_dim, dtype=np.float32)[sample] if discrete else sample.astype(np.float32)
                agent.state = None
            else:
                action = agent.act(obs, is_first, greedy=False, expl_amount=args.expl_amount)
            obs, reward, terminated, truncated, info = env.step(env_action(action, discrete))
            global_step += args.action_repeat
            replay.add(obs=obs, action=action, reward=reward, terminated=terminated, truncated=truncated, is_first=False)
            is_first = False
            if "episode" in info:
                last_return = float(info["episode"]["r"])
                writer.add_scalar("charts/episodic_return", last_return, global_step)
                writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]) * args.action_repeat, global_step)
            if terminated or truncated:
                obs, _ = env.reset()
                is_first = True
                replay.add(obs=obs, action=zero_action, reward=0.0, terminated=False, truncated=False, is_first=True)

            if global_step >= next_log:
                next_log += args.log_every
                for k, v in metrics_log.items():
                    tag = "perf" if k.endswith("_ms") else "world_model" if k in ("kl", "image_loss", "reward_loss", "discount_loss") else "losses"
                    writer.add_scalar(f"{tag}/{k}", mean(v), global_step)
                metrics_log.clear()
                writer.add_scalar("charts/SPS", progress.sps(global_step), global_step)
                print(progress.line(global_step, last_return), f"updates {updates}", flush=True)
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
        returns = evaluate(agent, args, args.eval_episodes, discrete)
        for r in returns:
            writer.add_scalar("eval/episodic_return", r, global_step)
        print(f"eval: mean return {np.mean(returns):.1f} over {len(returns)} greedy episodes")
    writer.close()
    env.close()


if __name__ == "__main__":
    main(parse_args(Args, PRESETS, default_preset))
