"""DreamerV2: "Mastering Atari with Discrete World Models", Hafner, Lillicrap, Norouzi, Ba (2021), arXiv 2010.02193.

A recurrent state-space model with 32 categorical latents of 32 classes each is learned from replayed
sequences (reconstruction, reward and discount likelihoods plus a KL-balanced prior). An actor and a
critic are then trained purely inside the model: 15-step imagined rollouts from every posterior state,
λ-returns as targets, REINFORCE for discrete actions, backpropagation through the dynamics for continuous.

Run:  python algos/dreamer_v2.py --env-id ALE/Pong-v5                 (atari preset, GPU)
      python algos/dreamer_v2.py --env-id dm_control/walker-walk-v0    (dmc preset)
      python algos/dreamer_v2.py --env-id CartPole-v1                  (small preset, CPU)
      python algos/dreamer_v2.py --resume runs/<run_name> --env-id ...  (continue a stopped run)
The preset is chosen from the env id (atari for ALE/, dmc for dm_control/, small otherwise) or with
--preset; every flag given explicitly wins over the preset.

Deviations from the paper / official code (danijar/dreamerv2):
 1. REINFORCE pairs ln π(â_t|ẑ_t) with sg(V^λ_t − v_targ(ẑ_t)) exactly as the paper's Eq. 6 writes it;
    the final official code pairs the action taken at ẑ_t with V^λ_{t+1} instead. Both are unbiased
    policy gradients (the baseline depends on the state only); the paper's form keeps one index.
 2. Log-likelihoods of unit-variance Gaussians (image, reward, critic) are written as 0.5·squared error,
    dropping the constant; gradients are identical, logged values differ by that constant.
 3. The truncated-normal actor for continuous actions samples by inverse CDF (reparameterised) instead
    of TensorFlow Probability's sampler; same distribution, same clipping to [-1+1e-6, 1-1e-6].
 4. `train_every` and `prefill` count agent steps (one policy decision = action_repeat env steps) as the
    official code does; `total_timesteps` counts env steps (frames) as every file here does.
 5. The `small` preset (CPU) is ours: DreamerV2-small sizes (deter 200, 32×16 latents, CNN depth 16,
    MLPs 2×200), the Atari KL setting (β 0.1, no free nats), the Atari γ 0.999 and actor/critic lr 3e-4;
    it is not a configuration from the paper. With free nats 1 the small model's KL stays below 1 nat, so the prior
    got no gradient and imagination drifted from reality (MinAtar Breakout fell below random; see
    benchmarks/RESULTS.md). With γ 0.99 CartPole plateaued near 300: the cart's slow drift to the edge
    (~300 steps away) was discounted to 5% in the critic's target.
 6. Frames smaller than 64×64 (MinAtar's 10×10) are flattened and go through the MLP encoder/decoder:
    the paper's conv stack is built for 64×64 and upsampling would cost 5× the compute for no information.
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
from common.envs import env_family, is_image_space, make_env  # noqa: E402
from common.replay import Replay  # noqa: E402
from common.run import (  # noqa: E402
    Progress, add_video, check_finite, choose_device, load_checkpoint, make_writer, mean, open_run, parse_args,
    require, save_checkpoint, seed_everything, to_device,
)


# Hyperparameters (defaults: the paper's Atari setting, official configs.yaml `atari`)
@dataclass
class Args:
    exp_name: str = "dreamer_v2"
    """name of this experiment (the file name)"""
    env_id: str = "ALE/Pong-v5"
    """environment id (ALE/*, dm_control/*, MinAtar/*, CarRacing-v3 or any Box-observation gymnasium id)"""
    preset: str = "atari"
    """atari | dmc | small; chosen from the env id unless given; explicit flags win over it"""
    seed: int = 0
    """seed of python, numpy, torch and the environment"""
    total_timesteps: int = 200_000_000
    """environment steps (frames, counting action repeat) to train for"""
    cuda: bool = True
    """use CUDA if available (fp32 matmuls and convolutions then run in TF32: float32_matmul_precision high)"""
    torch_deterministic: bool = False
    """torch.backends.cudnn.deterministic and deterministic algorithms"""
    bf16: bool = False
    """bf16 autocast for the forward passes, CUDA or a CPU with bf16 units (losses and optimizer state stay fp32)"""
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
    video_every: int = 10_000
    """updates between open-loop videos (media/openloop); 0: none"""
    checkpoint_every: int = 1_000
    """updates between checkpoints"""

    # environment
    action_repeat: int = 4
    """environment steps per agent step (Atari frame skip 4; DMC 2)"""
    grayscale: bool = True
    """grayscale Atari frames"""
    pixels: bool | None = None
    """dm_control: True images, False proprioceptive vectors; None = the env family's default"""
    life_loss: bool = False
    """Atari: treat the loss of a life as termination during training (off in the official config)"""

    # replay and schedule
    replay_capacity: int = 2_000_000
    """rows (agent steps) held in replay"""
    batch_size: int = 16
    """sequences per batch"""
    batch_length: int = 50
    """steps per sequence"""
    prefill: int = 50_000
    """agent steps of uniformly random actions before training starts"""
    pretrain: int = 1
    """updates made once, right after the prefill"""
    train_every: int = 16
    """agent steps between updates"""

    # world model
    deter: int = 600
    """GRU state size h"""
    stoch: int = 32
    """number of categorical latent variables z"""
    classes: int = 32
    """classes per categorical variable"""
    hidden: int = 600
    """hidden units of the RSSM's input/output layers"""
    cnn_depth: int = 48
    """channels of the first conv layer (doubling each of the four layers)"""
    mlp_layers: int = 4
    """hidden layers of every MLP (heads, actor, critic, vector encoder/decoder)"""
    mlp_units: int = 400
    """units per MLP layer"""
    kl_balance: float = 0.8
    """α of KL balancing (Eq. 2 / Algorithm 2): weight of the prior's side"""
    kl_scale: float = 0.1
    """β, the KL loss scale"""
    free_nats: float = 0.0
    """free nats, applied to the mean KL"""
    discount_scale: float = 5.0
    """loss scale of the discount (continuation) head"""
    pred_discount: bool = True
    """learn a discount head (Atari); False uses the constant γ (DMC has no terminations)"""
    reward_transform: str = "tanh"
    """tanh (Atari) or identity: the transform of training rewards"""
    model_lr: float = 2e-4
    """world model learning rate"""

    # actor-critic
    horizon: int = 15
    """imagination horizon H"""
    gamma: float = 0.999
    """discount γ"""
    lambda_: float = 0.95
    """λ of the λ-return"""
    actor_grad: str = "auto"
    """reinforce | dynamics | auto (reinforce for discrete actions, dynamics for continuous)"""
    actor_entropy: float = 1e-3
    """η, entropy regulariser of the actor"""
    actor_lr: float = 4e-5
    """actor learning rate"""
    critic_lr: float = 1e-4
    """critic learning rate"""
    target_update_every: int = 100
    """updates between copies of the critic into the slow target critic"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    grad_clip: float = 100.0
    """global gradient norm clip per optimizer"""
    weight_decay: float = 1e-6
    """decoupled weight decay: every parameter is multiplied by (1 - wd) each update, as officially"""


PRESETS = {
    "atari": {},
    "dmc": dict(
        total_timesteps=1_000_000, action_repeat=2, grayscale=False, prefill=1000, pretrain=100, train_every=5,
        deter=200, hidden=200, kl_scale=1.0, free_nats=1.0, pred_discount=False, discount_scale=1.0,
        reward_transform="identity", model_lr=3e-4, gamma=0.99, actor_entropy=1e-4, actor_lr=8e-5, critic_lr=8e-5,
        log_every=5_000,
    ),
    "small": dict(
        total_timesteps=100_000, action_repeat=1, grayscale=False, prefill=2_500, pretrain=100, train_every=5,
        replay_capacity=1_000_000, deter=200, hidden=200, stoch=32, classes=16, cnn_depth=16, mlp_layers=2,
        mlp_units=200, kl_scale=0.1, free_nats=0.0, discount_scale=5.0, reward_transform="identity",
        model_lr=3e-4, gamma=0.999, actor_entropy=1e-3, actor_lr=3e-4, critic_lr=3e-4, log_every=1_000,
        video_every=2_000, checkpoint_every=500, eval_episodes=5,
    ),
}


def default_preset(env_id: str) -> str:
    return {"atari": "atari", "dmc": "dmc"}.get(env_family(env_id), "small")


def check_args(args: Args) -> None:
    """Each numeric flag in its range, before a run directory is made or an env built (common/run.py require)."""
    require(args, "≥ 1", lambda v: v >= 1, "total_timesteps", "log_every", "checkpoint_every", "action_repeat",
            "replay_capacity", "batch_size", "batch_length", "prefill", "pretrain", "train_every", "deter", "stoch",
            "classes", "hidden", "cnn_depth", "mlp_layers", "mlp_units", "horizon", "target_update_every")
    require(args, "≥ 0 (0: off)", lambda v: v >= 0, "eval_episodes", "video_every")
    require(args, "≥ 0", lambda v: v >= 0, "seed", "kl_scale", "free_nats", "discount_scale", "actor_entropy")
    require(args, "> 0", lambda v: v > 0, "model_lr", "actor_lr", "critic_lr", "adam_eps", "grad_clip")
    require(args, "in [0, 1]", lambda v: 0 <= v <= 1, "kl_balance", "lambda_")
    require(args, "in (0, 1]", lambda v: 0 < v <= 1, "gamma")
    require(args, "in [0, 1)", lambda v: 0 <= v < 1, "weight_decay")


# Networks
def mlp(inp: int, out: int, layers: int, units: int) -> nn.Sequential:
    """`layers` ELU layers of `units`, then a linear output."""
    mods, size = [], inp
    for _ in range(layers):
        mods += [nn.Linear(size, units), nn.ELU()]
        size = units
    return nn.Sequential(*mods, nn.Linear(size, out))


class ConvEncoder(nn.Module):
    """Four conv layers (kernel 4, stride 2, depth d·2^i, ELU): 64x64 -> 2x2x8d, flattened (1536 for d 48)."""

    def __init__(self, channels: int, depth: int):
        super().__init__()
        layers, c = [], channels
        for i in range(4):
            layers += [nn.Conv2d(c, depth * 2**i, 4, 2), nn.ELU()]
            c = depth * 2**i
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_dim = 32 * depth

    def forward(self, obs):  # obs (N, C, 64, 64) in [-0.5, 0.5]
        return self.net(obs.contiguous(memory_format=torch.channels_last))  # faster CPU convs, same result


class ConvDecoder(nn.Module):
    """Linear to 32d, then transposed convs with kernels 5, 5, 6, 6 and stride 2: 1 -> 5 -> 13 -> 30 -> 64."""

    def __init__(self, feat: int, channels: int, depth: int):
        super().__init__()
        self.depth = depth
        self.inp = nn.Linear(feat, 32 * depth)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32 * depth, 4 * depth, 5, 2), nn.ELU(),
            nn.ConvTranspose2d(4 * depth, 2 * depth, 5, 2), nn.ELU(),
            nn.ConvTranspose2d(2 * depth, depth, 6, 2), nn.ELU(),
            nn.ConvTranspose2d(depth, channels, 6, 2),
        )

    def forward(self, feat):  # (N, feat) -> image mean (N, C, 64, 64)
        # The first transposed conv sees a 1x1 map, where it is exactly a dense layer: computed as one matmul
        # with its own weights (same result; PyTorch's CPU conv-transpose kernel is ~10x slower on this shape).
        first = self.net[0]
        x = self.inp(feat) @ first.weight.flatten(1)  # (N, 32d) @ (32d, C'·5·5)
        x = x.view(-1, first.out_channels, 5, 5) + first.bias.view(1, -1, 1, 1)
        return self.net[1:](x.contiguous(memory_format=torch.channels_last))


class LayerNormGRUCell(nn.Module):
    """The official GRU: one linear over [input, h], layer norm, update gate biased by -1."""

    def __init__(self, inp: int, size: int):
        super().__init__()
        self.linear = nn.Linear(inp + size, 3 * size)
        self.norm = nn.LayerNorm(3 * size)

    def forward(self, x, h):
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)
        return update * cand + (1 - update) * h


def straight_through_sample(logits):
    """One-hot sample whose gradient is that of the probabilities (Algorithm 1 of the paper)."""
    probs = F.softmax(logits.float(), -1)  # fp32 even under bf16 autocast, so the draw is exact
    # inverse-CDF draw: the first class whose cumulative probability exceeds u ~ U(0, 1)
    u = torch.rand(probs.shape[:-1] + (1,), device=probs.device, dtype=probs.dtype)
    index = (probs.cumsum(-1) < u).sum(-1).clamp_max(probs.shape[-1] - 1)
    sample = F.one_hot(index, probs.shape[-1]).to(probs.dtype)
    return sample + probs - probs.detach()


class RSSM(nn.Module):
    """Recurrent state-space model (Eq. 1). State: deter h_t (GRU) and stoch z_t (stoch × classes one-hots).

        prior  h_t = f(h_{t-1}, z_{t-1}, a_{t-1});  ẑ_t ~ p(ẑ_t | h_t)            (img_step)
        post   z_t ~ q(z_t | h_t, x_t)                                             (obs_step)
    """

    def __init__(self, action_dim: int, embed: int, deter: int, stoch: int, classes: int, hidden: int):
        super().__init__()
        self.deter, self.stoch, self.classes = deter, stoch, classes
        self.img_in = nn.Sequential(nn.Linear(stoch * classes + action_dim, hidden), nn.ELU())
        self.cell = LayerNormGRUCell(hidden, deter)
        self.img_out = nn.Sequential(nn.Linear(deter, hidden), nn.ELU(), nn.Linear(hidden, stoch * classes))
        self.obs_out = nn.Sequential(nn.Linear(deter + embed, hidden), nn.ELU(), nn.Linear(hidden, stoch * classes))

    def initial(self, batch: int, device) -> dict:
        return dict(deter=torch.zeros(batch, self.deter, device=device),
                    stoch=torch.zeros(batch, self.stoch * self.classes, device=device))

    def img_step(self, state: dict, action) -> dict:
        x = self.img_in(torch.cat([state["stoch"], action], -1))
        deter = self.cell(x, state["deter"])
        logits = self.img_out(deter).view(-1, self.stoch, self.classes)
        return dict(deter=deter, stoch=straight_through_sample(logits).flatten(1), logits=logits)

    def obs_step(self, prior: dict, embed) -> dict:
        logits = self.obs_out(torch.cat([prior["deter"], embed], -1)).view(-1, self.stoch, self.classes)
        return dict(deter=prior["deter"], stoch=straight_through_sample(logits).flatten(1), logits=logits)

    def observe(self, embed, action, is_first, state: dict | None = None):
        """Filter a batch of sequences. embed (B, T, E), action (B, T, A), is_first (B, T).

        Alignment (common/replay.py): action[t] is the action that led to x_t, so
            t          :  0     1     2
            x_t        :  x0    x1    x2
            action[t]  :  -     a0    a1        (zeros where is_first)
            h_t        :  f(h_{t-1}, z_{t-1}, action[t]);  z_t ~ q(· | h_t, x_t)
        Where is_first[t] the previous state and action are zeroed, so every episode starts afresh.
        Returns post and prior dicts of (B, T, ...) tensors.
        """
        B, T = action.shape[:2]
        state = state or self.initial(B, action.device)
        posts, priors = [], []
        for t in range(T):
            keep = (1.0 - is_first[:, t].float()).unsqueeze(-1)
            state = {k: v * keep for k, v in state.items() if k != "logits"}
            prior = self.img_step(state, action[:, t] * keep)
            state = self.obs_step(prior, embed[:, t])
            posts.append(state)
            priors.append(prior)
        stack = lambda states: {k: torch.stack([s[k] for s in states], 1) for k in states[0]}  # noqa: E731
        return stack(posts), stack(priors)


def feature(state: dict):
    """The model state fed to every head: [z_t (flattened one-hots), h_t]."""
    return torch.cat([state["stoch"], state["deter"]], -1)


class WorldModel(nn.Module):
    """Encoder, RSSM and the heads p(x_t | s_t), p(r_t | s_t), p(γ_t | s_t)."""

    def __init__(self, obs_space: gym.Space, action_dim: int, args: Args):
        super().__init__()
        self.obs_shape = obs_space.shape
        self.image = is_image_space(obs_space)  # uint8 frames, scaled to [-0.5, 0.5]
        self.conv = self.image and obs_space.shape[1:] == (64, 64)  # the paper's conv stack needs 64x64
        size = int(np.prod(obs_space.shape))  # vectors, or frames too small for it (MinAtar's 10x10) flattened
        if self.conv:
            self.encoder = ConvEncoder(obs_space.shape[0], args.cnn_depth)
            embed = self.encoder.out_dim
        else:
            # mlp_layers ELU layers of mlp_units; the last hidden layer is the embedding
            self.encoder = nn.Sequential(mlp(size, args.mlp_units, args.mlp_layers - 1, args.mlp_units), nn.ELU())
            embed = args.mlp_units
        self.rssm = RSSM(action_dim, embed, args.deter, args.stoch, args.classes, args.hidden)
        feat = args.deter + args.stoch * args.classes
        self.feat_dim = feat
        if self.conv:
            self.decoder = ConvDecoder(feat, obs_space.shape[0], args.cnn_depth)
        else:
            self.decoder = mlp(feat, size, args.mlp_layers, args.mlp_units)
        self.reward = mlp(feat, 1, args.mlp_layers, args.mlp_units)
        self.discount = mlp(feat, 1, args.mlp_layers, args.mlp_units)

    def preprocess(self, obs):
        """uint8 frames -> [-0.5, 0.5] (flattened unless 64x64); vectors unchanged."""
        if not self.image:
            return obs.float()
        x = obs.float() / 255.0 - 0.5
        return x if self.conv else x.flatten(-3)

    def embed(self, obs):  # (B, T, ...) -> (B, T, E)
        B, T = obs.shape[:2]
        return self.encoder(self.preprocess(obs).flatten(0, 1)).view(B, T, -1)

    def decode(self, feat):  # (B, T, F) -> (B, T, *obs_shape), the mean of p(x | s)
        B, T = feat.shape[:2]
        out = self.decoder(feat.flatten(0, 1))
        return out.view(B, T, *out.shape[1:])


class TruncatedNormal:
    """Normal(loc, scale) truncated to [-1, 1], per dimension; samples reparameterised by inverse CDF."""

    def __init__(self, loc, scale, low=-1.0, high=1.0, clip=1e-6):
        self.loc, self.scale, self.low, self.high, self.clip = loc, scale, low, high, clip
        normal = torch.distributions.Normal(0.0, 1.0)
        self.alpha, self.beta = (low - loc) / scale, (high - loc) / scale
        self.cdf_a, self.cdf_b = normal.cdf(self.alpha), normal.cdf(self.beta)
        self.Z = (self.cdf_b - self.cdf_a).clamp_min(1e-8)

    def rsample(self):
        u = self.cdf_a + torch.rand_like(self.loc) * self.Z
        u = u.clamp(1e-6, 1 - 1e-6)
        x = self.loc + self.scale * math.sqrt(2) * torch.erfinv(2 * u - 1)
        clipped = x.clamp(self.low + self.clip, self.high - self.clip)
        return x + (clipped - x).detach()

    sample = rsample

    def log_prob(self, x):
        xi = (x - self.loc) / self.scale
        return (-0.5 * xi**2 - torch.log(math.sqrt(2 * math.pi) * self.scale * self.Z)).sum(-1)

    def entropy(self):
        phi = lambda v: torch.exp(-0.5 * v**2) / math.sqrt(2 * math.pi)  # noqa: E731
        ent = torch.log(math.sqrt(2 * math.pi * math.e) * self.scale * self.Z)
        ent = ent + (self.alpha * phi(self.alpha) - self.beta * phi(self.beta)) / (2 * self.Z)
        return ent.sum(-1)

    @property
    def mode(self):
        return self.loc


class OneHotCategorical(torch.distributions.OneHotCategorical):
    """Categorical over one-hot actions; `rsample` is the straight-through sample."""

    def rsample(self, sample_shape=torch.Size()):
        return straight_through_sample(self.logits)

    @property
    def mode(self):
        return F.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).float()


class Actor(nn.Module):
    """π(â_t | ẑ_t): one-hot categorical (discrete) or truncated normal on [-1, 1] (continuous)."""

    def __init__(self, feat: int, action_dim: int, discrete: bool, layers: int, units: int, min_std: float = 0.1):
        super().__init__()
        self.discrete, self.min_std = discrete, min_std
        self.net = mlp(feat, action_dim if discrete else 2 * action_dim, layers, units)

    def forward(self, feat):
        out = self.net(feat).float()
        if self.discrete:
            return OneHotCategorical(logits=out, validate_args=False)
        mean, std = out.chunk(2, -1)
        return TruncatedNormal(torch.tanh(mean), 2 * torch.sigmoid(std / 2) + self.min_std)


# Losses and targets
def kl_categorical(post_logits, prior_logits):
    """KL(q ‖ p) of stoch independent categoricals, summed over the variables: (...,)."""
    post_logp, prior_logp = F.log_softmax(post_logits, -1), F.log_softmax(prior_logits, -1)
    return (post_logp.exp() * (post_logp - prior_logp)).sum((-2, -1))


def kl_balanced_loss(post_logits, prior_logits, balance: float, free: float):
    """KL balancing (paper Sec. 2.2, Algorithm 2), free nats applied to the mean as officially:

        α · max(mean KL(sg(q) ‖ p), free) + (1 − α) · max(mean KL(q ‖ sg(p)), free)

    The prior receives α of the gradient, the posterior 1 − α. Returns (loss, mean KL value).
    """
    kl_prior = kl_categorical(post_logits.detach(), prior_logits).mean()
    kl_post = kl_categorical(post_logits, prior_logits.detach()).mean()
    loss = balance * kl_prior.clamp_min(free) + (1 - balance) * kl_post.clamp_min(free)
    return loss, kl_prior.detach()


def lambda_return(reward, value, discount, lambda_: float):
    """Eq. 4, the λ-return over an imagined trajectory ẑ_0 … ẑ_H; all inputs (H+1, N):

        V^λ_t = r̂_t + γ̂_t · ((1 − λ) · v(ẑ_{t+1}) + λ · V^λ_{t+1})   for t < H,     V^λ_H = v(ẑ_H)

        t          :  0     1     2   …   H-1    H
        reward     :  r̂_0   r̂_1   r̂_2      r̂_H-1  (r̂_H unused)
        discount   :  γ̂_0   γ̂_1   γ̂_2      γ̂_H-1  (γ̂_H unused)
        value      :  v_0   v_1   v_2      v_H-1  v_H   (v_0 unused; v_H bootstraps)
        returns    :  V_0   V_1   V_2      V_H-1

    r̂_t and γ̂_t are predicted from ẑ_t: the reward that came with ẑ_t and whether ẑ_t continues.
    Returns (H, N): V^λ_0 … V^λ_{H-1}.
    """
    next_return = value[-1]
    returns = []
    for t in reversed(range(reward.shape[0] - 1)):
        next_return = reward[t] + discount[t] * ((1 - lambda_) * value[t + 1] + lambda_ * next_return)
        returns.append(next_return)
    return torch.stack(returns[::-1])


def trajectory_weight(discount):
    """Cumulative predicted discount: w_t = Π_{i<t} γ̂_i (w_0 = 1), down-weighting states after a
    likely termination. discount (H+1, N) -> weights (H+1, N)."""
    return torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-1]], 0), 0)


def actor_loss_reinforce(log_prob, entropy, returns, baseline, weight, eta: float):
    """Eq. 6 with ρ = 1 (Atari): −E[ w_t · (ln π(â_t|ẑ_t) · sg(V^λ_t − v(ẑ_t)) + η H[π(·|ẑ_t)]) ].
    All arguments (H, N) for t = 0 … H-1; `baseline` comes from the slow target critic as officially."""
    advantage = (returns - baseline).detach()
    return -(weight.detach() * (log_prob * advantage + eta * entropy)).mean()


def actor_loss_dynamics(entropy, returns, weight, eta: float):
    """Eq. 6 with ρ = 0 (continuous control): −E[ w_t · (V^λ_t + η H[π(·|ẑ_t)]) ], the gradient
    flowing through V^λ into the imagined states and reparameterised actions."""
    return -(weight.detach() * (returns + eta * entropy)).mean()


def critic_loss(value, returns, weight):
    """Eq. 5: E[ w_t · ½ (v_ξ(ẑ_t) − sg(V^λ_t))² ] for t = 0 … H-1."""
    return (weight.detach() * 0.5 * (value - returns.detach()) ** 2).mean()


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Eq. 2: image, reward and discount negative log-likelihoods plus β · KL balancing.

    Targets share the index of the posterior they are read from (common/replay.py): x_t, r_t (the
    reward that came with x_t) and γ_t = γ · (1 − terminated_t). Returns loss, posterior states, metrics.
    """
    embed = wm.embed(batch["obs"])
    post, prior = wm.rssm.observe(embed, batch["action"], batch["is_first"])
    feat = feature(post)
    obs = wm.preprocess(batch["obs"])
    image_nll = 0.5 * (wm.decode(feat).float() - obs).pow(2).flatten(2).sum(-1).mean()
    reward_target = torch.tanh(batch["reward"]) if args.reward_transform == "tanh" else batch["reward"]
    reward_nll = 0.5 * (wm.reward(feat).squeeze(-1).float() - reward_target).pow(2).mean()
    discount_target = args.gamma * (1.0 - batch["terminated"].float())
    discount_nll = F.binary_cross_entropy_with_logits(wm.discount(feat).squeeze(-1).float(), discount_target)
    kl_loss, kl_value = kl_balanced_loss(post["logits"].float(), prior["logits"].float(), args.kl_balance, args.free_nats)
    loss = image_nll + reward_nll + args.kl_scale * kl_loss
    if args.pred_discount:
        loss = loss + args.discount_scale * discount_nll
    metrics = dict(image_loss=image_nll, reward_loss=reward_nll, discount_loss=discount_nll, kl=kl_value, model_loss=loss)
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
    """Roll the prior forward H steps from the start states with actions from the actor.

        t        :  0      1      …   H
        state    :  ẑ_0    ẑ_1        ẑ_H       ẑ_0 = a posterior of the batch
        action   :  â_0    â_1        -         â_t ~ π(· | ẑ_t), ẑ_{t+1} = img_step(ẑ_t, â_t)
    Returns feats (H+1, N, F) and actions (H, N, A).
    """
    state = {k: v for k, v in start.items() if k != "logits"}
    feats, actions = [feature(state)], []
    for _ in range(horizon):
        action = actor(feats[-1].detach()).rsample()
        state = wm.rssm.img_step(state, action)
        feats.append(feature(state))
        actions.append(action)
    return torch.stack(feats), torch.stack(actions)


def imagined_targets(wm: WorldModel, target_critic, feats, terminated, args: Args):
    """Rewards r̂_t, discounts γ̂_t, slow-critic values v_t, λ-returns V^λ_t and weights w_t of an imagined
    trajectory feats (H+1, N, F). The first state is real, so its continuation γ̂_0 = γ (1 − terminated)
    comes from the data rather than the discount head (as in the official code)."""
    reward = wm.reward(feats).squeeze(-1).float()  # in the transformed (e.g. tanh) reward scale
    if args.pred_discount:
        discount = torch.sigmoid(wm.discount(feats).squeeze(-1).float())  # the head predicts γ·continue
        discount = torch.cat([args.gamma * (1.0 - terminated.flatten().float())[None], discount[1:]], 0)
    else:
        discount = torch.full_like(reward, args.gamma)
    value = target_critic(feats).squeeze(-1).float()
    returns = lambda_return(reward, value, discount, args.lambda_)  # (H, N)
    weight = trajectory_weight(discount)[:-1]
    return reward, discount, value, returns, weight


def behaviour_loss(wm, actor, critic, target_critic, post, terminated, args: Args, discrete: bool):
    """Actor and critic losses from H-step imagination starting at every posterior of the batch."""
    start = {k: v.detach().flatten(0, 1) for k, v in post.items()}
    reinforce = args.actor_grad == "reinforce" or (args.actor_grad == "auto" and discrete)
    with frozen(wm, target_critic), torch.set_grad_enabled(not reinforce):
        # REINFORCE needs no gradient through the rollout: imagine without autograd.
        feats, actions = imagine(wm, actor, start, args.horizon)
        reward, _, value, returns, weight = imagined_targets(wm, target_critic, feats, terminated, args)
    policy = actor(feats[:-1].detach())
    entropy = policy.entropy()
    if reinforce:
        log_prob = policy.log_prob(actions.detach())
        loss_actor = actor_loss_reinforce(log_prob, entropy, returns, value[:-1], weight, args.actor_entropy)
    else:
        loss_actor = actor_loss_dynamics(entropy, returns, weight, args.actor_entropy)
    loss_critic = critic_loss(critic(feats[:-1].detach()).squeeze(-1).float(), returns, weight)
    metrics = dict(actor_loss=loss_actor, critic_loss=loss_critic, actor_entropy=entropy.mean(),
                   imag_return=returns.mean(), imag_reward=reward.mean())
    return loss_actor, loss_critic, metrics


def optimizer_step(opt, loss, module, clip: float, weight_decay: float):
    """Backward, global-norm clip, official decoupled weight decay (p ← (1 − wd)·p), Adam step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(module.parameters(), clip)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1 - weight_decay)
    opt.step()
    return norm


def train_update(wm, actor, critic, target_critic, opts, batch, args: Args, discrete: bool, updates: int, save):
    """One update (Algorithm 1's inner loop): the world model on a replayed batch, then the actor and the
    critic in imagination from its posteriors; the slow critic copies the critic every
    `target_update_every` updates. `save` is called before stopping on a non-finite loss."""
    model_opt, actor_opt, critic_opt = opts
    autocast = torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with autocast:
        model_loss, post, metrics = world_model_loss(wm, batch, args)
    check_finite({"model_loss": model_loss}, updates, save)
    optimizer_step(model_opt, model_loss, wm, args.grad_clip, args.weight_decay)
    with autocast:
        loss_actor, loss_critic, ac_metrics = behaviour_loss(
            wm, actor, critic, target_critic, post, batch["terminated"], args, discrete)
    check_finite({"actor_loss": loss_actor, "critic_loss": loss_critic}, updates, save)
    optimizer_step(actor_opt, loss_actor, actor, args.grad_clip, args.weight_decay)
    optimizer_step(critic_opt, loss_critic, critic, args.grad_clip, args.weight_decay)
    if updates % args.target_update_every == 0:
        target_critic.load_state_dict(critic.state_dict())
    return {k: v.detach() for k, v in {**metrics, **ac_metrics}.items()}


# Acting
class Agent:
    """Online filter for acting: keeps (state, previous action) across env steps, resets at is_first."""

    def __init__(self, wm: WorldModel, actor: Actor, action_dim: int, device):
        self.wm, self.actor, self.action_dim, self.device = wm, actor, action_dim, device
        self.state, self.prev_action = None, None

    @torch.no_grad()
    def act(self, obs, is_first: bool, greedy: bool):
        if is_first or self.state is None:
            self.state = self.wm.rssm.initial(1, self.device)
            self.prev_action = torch.zeros(1, self.action_dim, device=self.device)
        obs = torch.as_tensor(obs, device=self.device)[None, None]
        prior = self.wm.rssm.img_step(self.state, self.prev_action)
        self.state = self.wm.rssm.obs_step(prior, self.wm.embed(obs)[:, 0])
        policy = self.actor(feature(self.state))
        action = policy.mode if greedy else policy.sample()
        self.prev_action = action.float()
        return action[0].float().cpu().numpy()


def env_action(action: np.ndarray, discrete: bool):
    """The model's action (one-hot or [-1, 1] vector) as the env expects it."""
    return int(action.argmax()) if discrete else action


def evaluate(agent: Agent, args: Args, episodes: int, discrete: bool) -> list[float]:
    """Greedy episodes (the actor's mode) in a fresh env without life loss; returns their raw returns."""
    env = make_env(args.env_id, args.seed + 10_000, pixels=args.pixels, action_repeat=args.action_repeat,
                   grayscale=args.grayscale and env_family(args.env_id) == "atari")
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
    (T, C, 3H, N·W): truth on top, the model in the middle, the error below, N sequences side by side."""
    n = min(6, batch["obs"].shape[0])
    obs, action, is_first = batch["obs"][:n], batch["action"][:n], batch["is_first"][:n]
    post, _ = wm.rssm.observe(wm.embed(obs[:, :context]), action[:, :context], is_first[:, :context])
    recon = wm.decode(feature(post))
    state = {k: v[:, -1] for k, v in post.items() if k != "logits"}
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
    family = env_family(args.env_id)
    env_kwargs = dict(pixels=args.pixels, grayscale=args.grayscale and family == "atari",
                      action_repeat=args.action_repeat, life_loss=args.life_loss)
    try:  # a bad env id or space stops here, before a run directory is made
        env = make_env(args.env_id, args.seed, **env_kwargs)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    discrete = isinstance(env.action_space, gym.spaces.Discrete)
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    if args.actor_grad not in ("auto", "reinforce", "dynamics"):
        raise SystemExit(f"--actor-grad must be auto, reinforce or dynamics, not '{args.actor_grad}'.")
    if discrete and args.actor_grad == "dynamics":
        raise SystemExit("--actor-grad dynamics needs continuous actions; this env's actions are discrete.")
    run_dir, resumed = open_run(args)
    if args.capture_video:
        env.close()
        env = make_env(args.env_id, args.seed, **env_kwargs, capture_video=True, video_dir=os.path.join(run_dir, "videos"))
    seed_everything(args.seed, args.torch_deterministic)
    device = choose_device(args.cuda)

    wm = WorldModel(env.observation_space, action_dim, args).to(device)
    actor = Actor(wm.feat_dim, action_dim, discrete, args.mlp_layers, args.mlp_units).to(device)
    critic = mlp(wm.feat_dim, 1, args.mlp_layers, args.mlp_units).to(device)
    target_critic = mlp(wm.feat_dim, 1, args.mlp_layers, args.mlp_units).to(device)
    target_critic.load_state_dict(critic.state_dict())
    model_opt = torch.optim.Adam(wm.parameters(), args.model_lr, eps=args.adam_eps)
    actor_opt = torch.optim.Adam(actor.parameters(), args.actor_lr, eps=args.adam_eps)
    critic_opt = torch.optim.Adam(critic.parameters(), args.critic_lr, eps=args.adam_eps)
    opts = (model_opt, actor_opt, critic_opt)
    replay = Replay(args.replay_capacity, os.path.join(run_dir, "episodes"), seed=args.seed)

    global_step, updates, last_return = 0, 0, None
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resumed:
        ckpt = load_checkpoint(ckpt_path, device, wm=wm, actor=actor, critic=critic, target_critic=target_critic,
                               model_opt=model_opt, actor_opt=actor_opt, critic_opt=critic_opt)
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
                wm=wm.state_dict(), actor=actor.state_dict(), critic=critic.state_dict(),
                target_critic=target_critic.state_dict(), model_opt=model_opt.state_dict(),
                actor_opt=actor_opt.state_dict(), critic_opt=critic_opt.state_dict(), global_step=global_step,
                updates=updates, last_return=last_return, replay_rng=replay.rng.bit_generator.state, args=vars(args)))
        return ckpt_path

    stop = []  # SIGTERM / Ctrl-C set this; the loop stops between steps, never inside an update
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))

    agent = Agent(wm, actor, action_dim, device)
    prefill_steps = args.prefill * args.action_repeat
    metrics_log: dict[str, list] = {}

    def update():
        nonlocal updates
        t0 = time.perf_counter()
        data = replay.sample(args.batch_size, args.batch_length)
        batch = to_device(data, device)
        metrics = train_update(wm, actor, critic, target_critic, opts, batch, args, discrete, updates, save)
        updates += 1
        for k, v in metrics.items():
            metrics_log.setdefault(k, []).append(v)  # a device tensor, read when logged
        metrics_log.setdefault("train_step_ms", []).append(1000 * (time.perf_counter() - t0))
        if args.video_every and updates % args.video_every == 0 and wm.image:
            add_video(writer, "media/openloop", openloop_video(wm, batch), global_step)
        if args.save_model and updates % args.checkpoint_every == 0:
            save()

    progress = Progress(args.total_timesteps, global_step, "prefill" if global_step < prefill_steps else "train")
    obs, _ = env.reset(seed=args.seed + global_step)
    is_first, agent_steps = True, global_step // args.action_repeat
    next_log = (global_step // args.log_every + 1) * args.log_every
    zero_action = np.zeros(action_dim, np.float32)
    try:
        replay.add(obs=obs, action=zero_action, reward=0.0, terminated=False, truncated=False, is_first=True)
        while global_step < args.total_timesteps:
            if stop:
                raise KeyboardInterrupt
            # act: random during prefill, else a sample of π given the filtered state
            if global_step < prefill_steps:
                sample = env.action_space.sample()
                action = np.eye(action_dim, dtype=np.float32)[sample] if discrete else sample.astype(np.float32)
                agent.state = None
            else:
                action = agent.act(obs, is_first, greedy=False)
            obs, reward, terminated, truncated, info = env.step(env_action(action, discrete))
            global_step += args.action_repeat
            agent_steps += 1
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

            # learn
            if global_step >= prefill_steps:
                if updates == 0:
                    progress.start_phase("train", global_step)
                    for _ in range(args.pretrain):
                        update()
                elif agent_steps % args.train_every == 0:
                    update()

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
