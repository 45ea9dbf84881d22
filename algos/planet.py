"""PlaNet: "Learning Latent Dynamics for Planning from Pixels", Hafner, Lillicrap, Fischer, Villegas, Ha, Lee,
Davidson (2019), arXiv 1811.04551.

A recurrent state-space model (RSSM: a deterministic GRU path h_t and a Gaussian stochastic state s_t) is
learned from replayed sequences by the variational bound of Eq. 3 (image and reward likelihoods, KL with
free nats, optional latent overshooting of Eq. 7). There is no policy network: every action is chosen by
the cross-entropy method (CEM) searching action sequences in the learned latent space (Algorithm 2).

Run:  python algos/planet.py --env-id dm_control/cartpole-swingup-v0      (dmc preset, the paper's setting)
      python algos/planet.py --env-id Pendulum-v1                         (small preset, CPU)
      python algos/planet.py --resume runs/<run_name> --env-id ...         (continue a stopped run)
The preset is chosen from the env id (dmc for dm_control/, small otherwise) or with --preset; every flag
given explicitly wins over the preset.

Deviations from the paper / official code (google-research/planet):
 1. Log-likelihoods of unit-variance Gaussians (image, reward) are written as 0.5·squared error, dropping
    the constant; gradients are identical.
 2. Latent overshooting (off by default, as in the paper's final agent) adds β · mean over d = 1 … D of
    the d-step KL to the one-step KL, with the posterior side stopped, the way the widely used PyTorch
    port (Kaixhin/PlaNet) weights it; the paper's β_d are not otherwise specified.
 3. Vector observations (e.g. Pendulum-v1) go through a 2-layer ELU MLP encoder and decoder instead of
    the conv stack; the paper only uses pixels. Frames are 5-bit quantised, vectors are not.
 4. The `small` preset (CPU) is ours, not the paper's: conv depth 16, batch 16 × 50, CEM with 300
    candidates, top 30, 6 iterations, free nats 1. With no free nats the posterior collapsed onto the
    prior on cartpole-swingup pixels (KL 0.00 nats within 200 updates: no observation reaches the state);
    with free nats the small model's KL stays under the threshold early on (0.5–1 nats), so the prior
    learns only from the steps above it. Pendulum-v1 learns with 1 (benchmarks/RESULTS.md).
 5. Seed episodes and the collect interval follow the paper; the updates of an interval are made right
    before each episode, so a run resumed mid-episode starts a fresh episode and trains first.
"""

# Imports
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
from common.envs import PLANET_ACTION_REPEAT, env_family, is_image_space, make_env  # noqa: E402
from common.replay import Replay  # noqa: E402
from common.run import (  # noqa: E402
    Progress, add_video, check_finite, choose_device, load_checkpoint, make_writer, mean, open_run, parse_args,
    require, save_checkpoint, seed_everything, to_device,
)


# Hyperparameters (defaults: the paper's DeepMind Control setting, Table/Appendix A)
@dataclass
class Args:
    exp_name: str = "planet"
    """name of this experiment (the file name)"""
    env_id: str = "dm_control/cartpole-swingup-v0"
    """environment id with continuous actions (dm_control/*, CarRacing-v3 or any Box-observation gymnasium id)"""
    preset: str = "dmc"
    """dmc | small; chosen from the env id unless given; explicit flags win over it"""
    seed: int = 0
    """seed of python, numpy, torch and the environment"""
    total_timesteps: int = 1_000_000
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
    """episodes planned without exploration noise at the end of training; 0: none"""
    log_every: int = 10_000
    """environment steps between progress lines and scalar logs"""
    video_every: int = 1_000
    """updates between open-loop videos (media/openloop); 0: none"""
    checkpoint_every: int = 1_000
    """updates between checkpoints"""

    # environment
    action_repeat: int = 0
    """environment steps per action; 0 = PlaNet's per-domain table (cartpole 8, cheetah/cup/reacher 4, finger/walker 2)"""
    pixels: bool | None = None
    """dm_control: True images, False proprioceptive vectors; None = the env family's default"""
    bit_depth: int = 5
    """bits per colour channel the frames are quantised to (with uniform dequantisation noise)"""

    # replay and schedule (Algorithm 1)
    replay_capacity: int = 1_000_000
    """rows (agent steps) held in replay"""
    seed_episodes: int = 5
    """S: episodes of uniformly random actions before training"""
    collect_interval: int = 100
    """C: gradient steps before each collected episode"""
    batch_size: int = 50
    """B: sequences per batch"""
    batch_length: int = 50
    """L: steps per sequence"""

    # world model
    deter: int = 200
    """GRU state size h"""
    stoch: int = 30
    """Gaussian stochastic state size s"""
    hidden: int = 200
    """hidden units of the RSSM's layers, the reward model and the vector encoder/decoder"""
    cnn_depth: int = 32
    """channels of the first conv layer (doubling each of the four layers; 32 gives the 1024 embedding)"""
    min_std: float = 0.1
    """minimum standard deviation of the prior and posterior"""
    free_nats: float = 3.0
    """free nats: the KL of each time step is clamped from below, max(KL_t, free_nats)"""
    kl_scale: float = 1.0
    """scale of the one-step KL"""
    overshooting_distance: int = 50
    """D: the longest multi-step prediction in latent overshooting"""
    overshooting_kl_scale: float = 0.0
    """β of latent overshooting (Eq. 7); 0 turns it off (the paper's final agent)"""
    model_lr: float = 1e-3
    """Adam learning rate"""
    adam_eps: float = 1e-4
    """Adam epsilon"""
    grad_clip: float = 1000.0
    """global gradient norm clip"""

    # planner (Algorithm 2)
    planning_horizon: int = 12
    """H: steps of each candidate action sequence"""
    candidates: int = 1000
    """J: action sequences evaluated per CEM iteration"""
    top_candidates: int = 100
    """K: elites the belief over action sequences is refitted to"""
    optimisation_iters: int = 10
    """I: CEM iterations per planned action"""
    action_noise: float = 0.3
    """std of the Gaussian exploration noise added to the planned action while collecting"""


PRESETS = {
    "dmc": {},
    "small": dict(
        total_timesteps=100_000, cnn_depth=16, batch_size=16, batch_length=50, candidates=300, top_candidates=30,
        optimisation_iters=6, free_nats=1.0, log_every=1_000, video_every=200, checkpoint_every=200, eval_episodes=5,
    ),
}


def default_preset(env_id: str) -> str:
    return "dmc" if env_family(env_id) == "dmc" else "small"


def check_args(args: Args) -> None:
    """Each numeric flag in its range, before a run directory is made or an env built (common/run.py require)."""
    require(args, "≥ 1", lambda v: v >= 1, "total_timesteps", "log_every", "checkpoint_every", "replay_capacity",
            "seed_episodes", "collect_interval", "batch_size", "batch_length", "deter", "stoch", "hidden", "cnn_depth",
            "overshooting_distance", "planning_horizon", "candidates", "optimisation_iters")
    require(args, f"in 1 … --candidates ({args.candidates})", lambda v: 1 <= v <= args.candidates, "top_candidates")
    require(args, "in 1 … 8", lambda v: 1 <= v <= 8, "bit_depth")
    require(args, "≥ 0 (0: off)", lambda v: v >= 0, "eval_episodes", "video_every")
    require(args, "≥ 0 (0: PlaNet's per-domain table)", lambda v: v >= 0, "action_repeat")
    require(args, "≥ 0", lambda v: v >= 0, "seed", "min_std", "free_nats", "kl_scale", "overshooting_kl_scale",
            "action_noise")
    require(args, "> 0", lambda v: v > 0, "model_lr", "adam_eps", "grad_clip")


def planet_action_repeat(env_id: str) -> int:
    """PlaNet's action repeat per dm_control domain (Appendix A); 1 for anything else."""
    if env_family(env_id) != "dmc":
        return 1
    domain = env_id.split("/")[-1].split("-")[0]
    return PLANET_ACTION_REPEAT.get(domain, 4)  # the paper's most common value for other domains


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
    """Recurrent state-space model (Eq. 2, Fig. 2c). State: deter h_t (GRU) and Gaussian stoch s_t.

        deterministic  h_t = f(h_{t-1}, s_{t-1}, a_{t-1})
        prior          s_t ~ p(s_t | h_t) = N(μ, σ)          (img_step)
        posterior      s_t ~ q(s_t | h_t, o_t) = N(μ, σ)     (obs_step)
    σ = softplus(·) + min_std. The sampled s_t is reparameterised.
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
        x = self.img_in(torch.cat([state["stoch"], action], -1))
        deter = self.cell(x, state["deter"])
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
    """The model state fed to the decoder and reward model: [s_t, h_t]."""
    return torch.cat([state["stoch"], state["deter"]], -1)


class WorldModel(nn.Module):
    """Encoder, RSSM, observation model p(o_t | h_t, s_t) and reward model p(r_t | h_t, s_t)."""

    def __init__(self, obs_space: gym.Space, action_dim: int, args: Args):
        super().__init__()
        self.image = is_image_space(obs_space)
        if self.image and obs_space.shape[1:] != (64, 64):
            raise ValueError(f"planet's conv encoder needs 64x64 frames, got {obs_space.shape}.")
        self.bit_depth = args.bit_depth
        size = int(np.prod(obs_space.shape))
        if self.image:
            self.encoder = ConvEncoder(obs_space.shape[0], args.cnn_depth)
            embed = self.encoder.out_dim
        else:
            self.encoder = nn.Sequential(mlp(size, args.hidden, 1, args.hidden), nn.ELU())
            embed = args.hidden
        self.rssm = RSSM(action_dim, embed, args.deter, args.stoch, args.hidden, args.min_std)
        self.feat_dim = args.deter + args.stoch
        self.decoder = ConvDecoder(self.feat_dim, obs_space.shape[0], args.cnn_depth) if self.image else \
            mlp(self.feat_dim, size, 2, args.hidden)
        self.reward = mlp(self.feat_dim, 1, 2, args.hidden)

    def preprocess(self, obs):
        """uint8 frames -> quantised to bit_depth bits in [-0.5, 0.5) plus dequantisation noise; vectors unchanged."""
        return quantise(obs, self.bit_depth) if self.image else obs.float()

    def embed(self, obs):  # (B, T, ...) -> (B, T, E)
        B, T = obs.shape[:2]
        return self.encoder(obs.flatten(0, 1)).view(B, T, -1)

    def decode(self, feat):  # (B, T, F) -> (B, T, *obs_shape), the mean of p(o | s)
        B, T = feat.shape[:2]
        out = self.decoder(feat.flatten(0, 1))
        return out.view(B, T, *out.shape[1:])


# Losses and targets
def quantise(obs, bit_depth: int):
    """Appendix: reduce 8-bit frames to `bit_depth` bits, centre on [-0.5, 0.5), add uniform noise of one bin."""
    bins = 2**bit_depth
    x = torch.floor(obs.float() / 2 ** (8 - bit_depth)) / bins - 0.5
    return x + torch.rand_like(x) / bins


def kl_gaussian(mean_q, std_q, mean_p, std_p):
    """KL(N(mean_q, std_q) ‖ N(mean_p, std_p)) of diagonal Gaussians, summed over the last dimension."""
    var_ratio = (std_q / std_p) ** 2
    return 0.5 * (var_ratio + ((mean_q - mean_p) / std_p) ** 2 - 1 - torch.log(var_ratio)).sum(-1)


def free_nats_kl(kl, free: float):
    """Eq. 3's KL term with free nats: max(KL_t, free) for every time step, then the mean. Below the
    threshold a step contributes a constant, so no gradient."""
    return kl.clamp_min(free).mean()


def latent_overshooting_kl(rssm: RSSM, post: dict, action, is_first, distance: int, free: float):
    """Eq. 7, latent overshooting: from every posterior s_t (not a prior) predict s_{t+d} with the prior
    alone for d = 1 … D using the real actions, and pull p(s_{t+d} | s_t) towards sg(q(s_{t+d})).

        start t      :  q(s_t)
        d = 1        :  p(s_{t+1} | s_t, action[t+1])             (the one-step prior of `observe`)
        d = 2        :  p(s_{t+2} | ŝ_{t+1}, action[t+2])   …
    Pairs whose window (t, t+d] contains a reset (is_first) are skipped. Returns the mean free-nats KL.
    """
    B, T = action.shape[:2]
    state = dict(deter=post["deter"], stoch=post["stoch"])
    valid = torch.ones(B, T, device=action.device)
    total, count = 0.0, 0.0
    for d in range(1, min(distance, T - 1) + 1):
        state = {k: v[:, : T - d] for k, v in state.items()}
        valid = valid[:, : T - d] * (1.0 - is_first[:, d:].float())
        step = rssm.img_step({k: v.flatten(0, 1) for k, v in state.items()}, action[:, d:].flatten(0, 1))
        step = {k: v.view(B, T - d, -1) for k, v in step.items()}
        kl = kl_gaussian(post["mean"][:, d:].detach(), post["std"][:, d:].detach(), step["mean"], step["std"])
        total = total + (kl.clamp_min(free) * valid).sum()
        count = count + valid.sum()
        state = dict(deter=step["deter"], stoch=step["stoch"])
    return total / max(float(count), 1.0)


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Eq. 3 (negated): −ln p(o_t | s_t) − ln p(r_t | s_t) + max(KL(q(s_t) ‖ p(s_t)), free), averaged.

    Targets share the index of the posterior they are read from (common/replay.py): o_t, and r_t, the
    reward returned together with o_t, i.e. earned by action[t], which the prior of s_t has seen.
    Returns loss, posterior states, metrics.
    """
    obs = wm.preprocess(batch["obs"])
    post, prior = wm.rssm.observe(wm.embed(obs), batch["action"], batch["is_first"])
    feat = feature(post)
    image_nll = 0.5 * (wm.decode(feat).float() - obs).pow(2).flatten(2).sum(-1).mean()
    reward_nll = 0.5 * (wm.reward(feat).squeeze(-1).float() - batch["reward"]).pow(2).mean()
    kl = kl_gaussian(post["mean"], post["std"], prior["mean"], prior["std"])  # (B, T)
    loss = image_nll + reward_nll + args.kl_scale * free_nats_kl(kl, args.free_nats)
    metrics = dict(image_loss=image_nll, reward_loss=reward_nll, kl=kl.mean())
    if args.overshooting_kl_scale > 0:
        over = latent_overshooting_kl(wm.rssm, post, batch["action"], batch["is_first"], args.overshooting_distance,
                                      args.free_nats)
        loss = loss + args.overshooting_kl_scale * over
        metrics["overshooting_kl"] = over
    metrics["model_loss"] = loss
    return loss, post, metrics


def train_update(wm: WorldModel, opt, batch: dict, args: Args, updates: int, save):
    """One gradient step on the world model (Algorithm 1's inner loop). `save` is called before stopping
    on a non-finite loss."""
    with torch.autocast(batch["obs"].device.type, dtype=torch.bfloat16, enabled=args.bf16):
        loss, _, metrics = world_model_loss(wm, batch, args)
    check_finite({"model_loss": loss}, updates, save)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    metrics["grad_norm"] = nn.utils.clip_grad_norm_(wm.parameters(), args.grad_clip)
    opt.step()
    return {k: v.detach() for k, v in metrics.items()}


# Acting: the CEM planner (Algorithm 2)
@torch.no_grad()
def cem_plan(rssm: RSSM, reward_model, state: dict, action_dim: int, horizon: int, candidates: int, top: int,
             iters: int, generator: torch.Generator | None = None):
    """Cross-entropy method over action sequences a_t … a_{t+H-1} in latent space, batched over candidates.

        belief      q(a_{t:t+H}) = N(μ, σ²I), μ = 0, σ = 1
        repeat I:   J sequences ~ q (clipped to [-1, 1]);  imagine s_{t+1} … s_{t+H} with the prior;
                    R = Σ_τ r̂(s_τ)  (r̂(s_{τ+1}) is the reward earned by a_τ, as in the replay alignment);
                    refit μ, σ to the top K sequences
        return      μ_t, the mean's first action
    `state` is the current filtered state (deter, stoch) of batch 1.
    """
    device = state["deter"].device
    mean = torch.zeros(horizon, 1, action_dim, device=device)
    std = torch.ones(horizon, 1, action_dim, device=device)
    start = {k: state[k].expand(candidates, -1) for k in ("deter", "stoch")}
    for _ in range(iters):
        noise = torch.randn(horizon, candidates, action_dim, device=device, generator=generator)
        actions = (mean + std * noise).clamp(-1, 1)
        s, feats = start, []
        for t in range(horizon):
            s = rssm.img_step(s, actions[t])
            feats.append(feature(s))
        returns = reward_model(torch.stack(feats)).float().squeeze(-1).sum(0)  # (J,)
        elites = actions[:, returns.topk(top).indices]  # (H, K, A)
        mean = elites.mean(1, keepdim=True)
        std = elites.std(1, unbiased=False, keepdim=True)
    return mean[0, 0]


class Planner:
    """Online filter + CEM: keeps (state, previous action) across env steps, resets at is_first."""

    def __init__(self, wm: WorldModel, action_dim: int, args: Args, device):
        self.wm, self.action_dim, self.args, self.device = wm, action_dim, args, device
        self.state, self.prev_action = None, None

    @torch.no_grad()
    def act(self, obs, is_first: bool, explore: bool):
        if is_first or self.state is None:
            self.state = self.wm.rssm.initial(1, self.device)
            self.prev_action = torch.zeros(1, self.action_dim, device=self.device)
        a = self.args
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            obs = self.wm.preprocess(torch.as_tensor(obs, device=self.device)[None, None])
            prior = self.wm.rssm.img_step(self.state, self.prev_action)
            self.state = self.wm.rssm.obs_step(prior, self.wm.embed(obs)[:, 0])
            action = cem_plan(self.wm.rssm, self.wm.reward, self.state, self.action_dim, a.planning_horizon,
                              a.candidates, a.top_candidates, a.optimisation_iters)
        if explore:
            action = (action + a.action_noise * torch.randn_like(action)).clamp(-1, 1)
        self.prev_action = action[None].float()
        return action.float().cpu().numpy()


def evaluate(planner: Planner, args: Args, episodes: int) -> list[float]:
    """Episodes planned without exploration noise in a fresh env; returns their raw returns."""
    env = make_env(args.env_id, args.seed + 10_000, pixels=args.pixels, action_repeat=args.action_repeat)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=args.seed + 10_000 + ep)
        is_first, done, total = True, False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(planner.act(obs, is_first, explore=False))
            total += float(reward)
            is_first, done = False, terminated or truncated
        returns.append(total)
    env.close()
    return returns


@torch.no_grad()
def openloop_video(wm: WorldModel, batch: dict, context: int = 5):
    """Observe `context` real frames, then predict the rest with the prior and the real actions; returns a
    uint8 video (T, 3, 3H, N·W): truth on top, the model in the middle, the error below."""
    n = min(6, batch["obs"].shape[0])
    obs, action, is_first = batch["obs"][:n], batch["action"][:n], batch["is_first"][:n]
    post, _ = wm.rssm.observe(wm.embed(wm.preprocess(obs[:, :context])), action[:, :context], is_first[:, :context])
    recon = wm.decode(feature(post))
    state = {k: post[k][:, -1] for k in ("deter", "stoch")}
    feats = []
    for t in range(context, obs.shape[1]):
        state = wm.rssm.img_step(state, action[:, t])
        feats.append(feature(state))
    model = torch.cat([recon, wm.decode(torch.stack(feats, 1))], 1).float() + 0.5
    truth = obs.float() / 255.0
    error = (model - truth + 1) / 2
    video = torch.cat([truth, model, error], 3).clamp(0, 1)  # (n, T, C, 3H, W)
    video = torch.cat(list(video), -1)  # (T, C, 3H, n·W)
    return (video * 255).to(torch.uint8).cpu()


# Training loop (Algorithm 1 of the paper)
def main(args: Args):
    check_args(args)
    if args.action_repeat == 0:
        args.action_repeat = planet_action_repeat(args.env_id)
    try:  # a bad env id or space stops here, before a run directory is made
        env = make_env(args.env_id, args.seed, pixels=args.pixels, action_repeat=args.action_repeat)
        if isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError(f"'{args.env_id}' has discrete actions; PlaNet's CEM planner here searches continuous "
                             f"actions (use dreamer_v1.py or dreamer_v2.py for discrete ones).")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    action_dim = env.action_space.shape[0]
    run_dir, resumed = open_run(args)
    if args.capture_video:
        env.close()
        env = make_env(args.env_id, args.seed, pixels=args.pixels, action_repeat=args.action_repeat,
                       capture_video=True, video_dir=os.path.join(run_dir, "videos"))
    seed_everything(args.seed, args.torch_deterministic)
    device = choose_device(args.cuda)

    wm = WorldModel(env.observation_space, action_dim, args).to(device)
    opt = torch.optim.Adam(wm.parameters(), args.model_lr, eps=args.adam_eps)
    replay = Replay(args.replay_capacity, os.path.join(run_dir, "episodes"), seed=args.seed)

    global_step, updates, episodes, last_return = 0, 0, 0, None
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resumed:
        ckpt = load_checkpoint(ckpt_path, device, wm=wm, opt=opt)
        global_step, updates, episodes, last_return = (ckpt["global_step"], ckpt["updates"], ckpt["episodes"],
                                                       ckpt.get("last_return"))
        rows = replay.load()
        replay.rng.bit_generator.state = ckpt["replay_rng"]
        print(f"resumed {run_dir} at step {global_step}, update {updates}; {rows} replay rows reloaded")
    writer = make_writer(run_dir, args, resumed)
    print(f"run: {run_dir}  preset: {args.preset}  obs {env.observation_space.shape}  actions {action_dim}  "
          f"action repeat {args.action_repeat}")

    def save():
        replay.save_partial()
        if args.save_model:
            save_checkpoint(ckpt_path, dict(
                wm=wm.state_dict(), opt=opt.state_dict(), global_step=global_step, updates=updates, episodes=episodes,
                last_return=last_return, replay_rng=replay.rng.bit_generator.state, args=vars(args)))
        return ckpt_path

    stop = []  # SIGTERM / Ctrl-C set this; the loop stops between steps, never inside an update
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))

    planner = Planner(wm, action_dim, args, device)
    metrics_log: dict[str, list] = {}
    progress = Progress(args.total_timesteps, global_step, "seed" if updates == 0 else "train")
    next_log = (global_step // args.log_every + 1) * args.log_every
    zero_action = np.zeros(action_dim, np.float32)
    obs, _ = env.reset(seed=args.seed + global_step)
    is_first = True
    try:
        replay.add(obs=obs, action=zero_action, reward=0.0, terminated=False, truncated=False, is_first=True)
        while global_step < args.total_timesteps:
            # Model fitting: C gradient steps before every episode once the S seed episodes are in
            if is_first and episodes >= args.seed_episodes:
                if updates == 0:
                    progress.start_phase("train", global_step)
                for _ in range(args.collect_interval):
                    if stop:
                        raise KeyboardInterrupt
                    t0 = time.perf_counter()
                    data = replay.sample(args.batch_size, args.batch_length)
                    batch = to_device(data, device)
                    metrics = train_update(wm, opt, batch, args, updates, save)
                    updates += 1
                    for k, v in metrics.items():
                        metrics_log.setdefault(k, []).append(v)  # a device tensor, read when logged
                    metrics_log.setdefault("train_step_ms", []).append(1000 * (time.perf_counter() - t0))
                    if args.video_every and updates % args.video_every == 0 and wm.image:
                        add_video(writer, "media/openloop", openloop_video(wm, batch), global_step)
                    if args.save_model and updates % args.checkpoint_every == 0:
                        save()
            if stop:
                raise KeyboardInterrupt

            # Data collection: random during the seed episodes, else CEM plus exploration noise
            if episodes < args.seed_episodes:
                action = env.action_space.sample().astype(np.float32)
            else:
                t0 = time.perf_counter()
                action = planner.act(obs, is_first, explore=True)
                metrics_log.setdefault("plan_ms", []).append(1000 * (time.perf_counter() - t0))
            obs, reward, terminated, truncated, info = env.step(action)
            global_step += args.action_repeat
            replay.add(obs=obs, action=action, reward=reward, terminated=terminated, truncated=truncated, is_first=False)
            is_first = False
            if "episode" in info:
                last_return = float(info["episode"]["r"])
                writer.add_scalar("charts/episodic_return", last_return, global_step)
                writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]) * args.action_repeat, global_step)
            if terminated or truncated:
                episodes += 1
                obs, _ = env.reset()
                is_first = True
                replay.add(obs=obs, action=zero_action, reward=0.0, terminated=False, truncated=False, is_first=True)

            if global_step >= next_log:
                next_log += args.log_every
                for k, v in metrics_log.items():
                    tag = "perf" if k.endswith("_ms") else "world_model"
                    writer.add_scalar(f"{tag}/{k}", mean(v), global_step)
                metrics_log.clear()
                writer.add_scalar("charts/SPS", progress.sps(global_step), global_step)
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
        returns = evaluate(planner, args, args.eval_episodes)
        for r in returns:
            writer.add_scalar("eval/episodic_return", r, global_step)
        print(f"eval: mean return {np.mean(returns):.1f} over {len(returns)} episodes without exploration noise")
    writer.close()
    env.close()


if __name__ == "__main__":
    main(parse_args(Args, PRESETS, default_preset))
