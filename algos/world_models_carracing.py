"""World Models: "Recurrent World Models Facilitate Policy Evolution" / "World Models", Ha, Schmidhuber (2018),
arXiv 1803.10122.

Three parts trained one after another on CarRacing-v3: V, a convolutional VAE that compresses each 64x64 frame
to z (32 numbers); M, an LSTM whose mixture-density output predicts P(z_{t+1} | z_t, a_t, h_t) as 5 Gaussians
per latent dimension; and C, a linear controller a_t = W [z_t, h_t] + b (867 parameters) evolved with CMA-ES
on the real environment's returns. The stages run in order and each can be stopped and resumed:

    1. data        random rollouts with a "brownian" policy, collected by parallel workers, stored as episodes
    2. vae         V on every stored frame (reconstruction + KL with the KL tolerance)
    3. mdnrnn      every episode encoded by V (μ, log σ² per frame), then M on sequences of sampled z
    4. controller  CMA-ES over C's 867 parameters, fitness = mean return of 16 rollouts, rollouts in workers;
                   finally the best candidate over `eval_episodes` real episodes

Run:  python algos/world_models_carracing.py                          (paper preset: 10,000 rollouts, population 64)
      python algos/world_models_carracing.py --preset small           (CPU: a scaled-down pipeline, ~30 minutes)
      python algos/world_models_carracing.py --resume runs/<run> --stage controller   (one stage of an earlier run)
A rerun with --resume skips every finished stage and continues an unfinished one where its checkpoint left it.

Dream mode (--dream, off by default; the paper's DoomTakeCover experiment applied to CarRacing): M also predicts
the reward and the end of the episode, and C is evolved entirely inside M sampled at temperature τ (starting
from the encoded first frames of stored rollouts), then evaluated in the real environment.

Deviations from the paper / official code (hardmaru/WorldModelsExperiments, carracing/):
 1. Frames are the whole 96x96 CarRacing image resized to 64x64 by common/envs.py (the official code first crops
    the bottom 12 rows showing the dashboard).
 2. Actions live in the env's unit box [-1, 1]^3 everywhere (stored, fed to M): C's official squashing (steer
    tanh, gas (tanh+1)/2, brake clip(tanh, 0, 1)) is applied and then mapped linearly into that box, which the
    env maps back. The random data policy is the brownian policy of the PyTorch reimplementation
    (ctallec/world-models: a_{t+1} = clip(a_t + √dt·N(0, I)), dt = 1/50) in that unit box; the official data came
    from controllers with random parameters.
 3. V is trained by streaming the stored episodes in shuffled chunks (`vae_chunk_episodes` episodes in memory at
    a time, frames shuffled within the chunk), not from one array of all 10M frames in memory.
 4. M is a plain LSTM with the forget-gate bias initialised to 1 (TensorFlow's BasicLSTMCell adds 1 there) and
    gradients clipped by value to ±1 as officially; batch and sequence length are arguments (official: 100 × 1000
    for 2,000 steps; PERFORMANCE_TARGETS times 16 × 32). Its input [z_t, a_t] gets one constant 0 appended (width
    35 → 36; the same function, see `MDNRNN.lstm_input`) because oneDNN's fast bf16 LSTM kernel wants an even width.
 5. CMA-ES gets the plain negated mean returns (no extra weight-decay term on the parameters).
 6. The `small` preset (CPU) is ours: 96 rollouts of at most 300 steps, 3 VAE epochs, 600 M updates of 16 × 32,
    population 16 with 2 rollouts of 300 steps for 30 generations, evaluation over 20 full episodes.
"""

# Imports
import glob
import multiprocessing as mp
import os
import pickle
import re
import signal
import sys
import time
from dataclasses import dataclass

import cma
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.envs import make_env  # noqa: E402
from common.replay import load_episode, save_episode  # noqa: E402
from common.run import (  # noqa: E402
    add_video, check_finite, choose_device, load_checkpoint, make_writer, open_run, parse_args, require,
    save_checkpoint, seed_everything, to_device,
)

STAGES = ("data", "vae", "mdnrnn", "controller")


# Hyperparameters (defaults: the paper and the official carracing code)
@dataclass
class Args:
    exp_name: str = "world_models_carracing"
    """name of this experiment (the file name)"""
    env_id: str = "CarRacing-v3"
    """environment id (CarRacing-v3: 64x64 frames, 3-dim continuous actions)"""
    preset: str = "paper"
    """paper | small; explicit flags win over it"""
    seed: int = 0
    """seed of python, numpy, torch, the rollouts and CMA-ES"""
    cuda: bool = True
    """use CUDA for training V and M if available (in TF32 for fp32; rollouts always run on CPU workers)"""
    torch_deterministic: bool = False
    """torch.backends.cudnn.deterministic and deterministic algorithms"""
    bf16: bool = False
    """bf16 autocast for V's and M's forward passes while training them; losses and optimizer state stay fp32"""
    capture_video: bool = False
    """record one episode of the best controller to runs/<run>/videos at the end of the controller stage"""
    save_model: bool = True
    """write runs/<run>/checkpoint.pt during and after each stage"""
    resume: str | None = None
    """a run directory to continue: finished stages are skipped, an unfinished one continues"""
    stage: str = "all"
    """all | data | vae | mdnrnn | controller: which stage(s) to run (a stage needs the ones before it)"""
    num_workers: int = 0
    """worker processes for rollouts; 0 = one per CPU core"""
    eval_episodes: int = 100
    """real episodes the best controller is evaluated over at the end; 0: none"""
    log_every: int = 100
    """V and M updates between scalar logs"""
    checkpoint_every: int = 500
    """V and M updates between checkpoints (C is checkpointed after every generation)"""

    # stage 1: data
    num_rollouts: int = 10_000
    """random rollouts collected"""
    max_episode_steps: int = 1_000
    """longest rollout (data and controller fitness); CarRacing's own limit is 1,000"""
    brownian_dt: float = 1 / 50
    """dt of the brownian random policy"""

    # stage 2: V
    z_size: int = 32
    """latent size z"""
    vae_batch_size: int = 100
    """frames per V update"""
    vae_lr: float = 1e-4
    """Adam learning rate of V"""
    vae_epochs: int = 10
    """passes over every stored frame"""
    kl_tolerance: float = 0.5
    """the KL of each frame is floored at kl_tolerance · z_size nats"""
    vae_chunk_episodes: int = 200
    """episodes held in memory at once while training V (their frames are shuffled together)"""

    # stage 3: M
    rnn_size: int = 256
    """LSTM units"""
    num_mixtures: int = 5
    """Gaussians per latent dimension"""
    rnn_batch_size: int = 100
    """sequences per M update"""
    rnn_seq_len: int = 1_000
    """steps per sequence"""
    rnn_steps: int = 2_000
    """M updates"""
    rnn_lr: float = 1e-3
    """Adam learning rate of M"""
    rnn_grad_clip: float = 1.0
    """each gradient element clipped to ±rnn_grad_clip"""
    temperature: float = 1.0
    """τ: temperature of M's samples (dream mode and the open-loop video); 1.15 was the paper's Doom setting"""

    # stage 4: C
    population: int = 64
    """CMA-ES population size"""
    rollouts_per_candidate: int = 16
    """rollouts averaged into one candidate's fitness"""
    sigma0: float = 0.1
    """CMA-ES initial step size"""
    generations: int = 2_000
    """CMA-ES generations"""
    dream: bool = False
    """evolve C inside M (M then also predicts reward and done) instead of the real env"""


PRESETS = {
    "paper": {},
    "small": dict(
        num_rollouts=96, max_episode_steps=300, vae_epochs=3, vae_chunk_episodes=96, rnn_batch_size=16,
        rnn_seq_len=32, rnn_steps=600, population=16, rollouts_per_candidate=2, generations=30, eval_episodes=20,
        log_every=50, checkpoint_every=200,
    ),
}


def default_preset(env_id: str) -> str:
    return "paper"


def check_args(args: Args) -> None:
    """Each numeric flag in its range, before a run directory is made or an env built (common/run.py require)."""
    require(args, "≥ 1", lambda v: v >= 1, "log_every", "checkpoint_every", "num_rollouts", "max_episode_steps",
            "z_size", "vae_batch_size", "vae_epochs", "vae_chunk_episodes", "rnn_size", "num_mixtures",
            "rnn_batch_size", "rnn_seq_len", "rnn_steps", "rollouts_per_candidate", "generations")
    require(args, "≥ 2 (CMA-ES ranks candidates)", lambda v: v >= 2, "population")
    require(args, "≥ 0 (0: one per CPU core)", lambda v: v >= 0, "num_workers")
    require(args, "≥ 0 (0: off)", lambda v: v >= 0, "eval_episodes")
    require(args, "≥ 0", lambda v: v >= 0, "seed", "kl_tolerance")
    require(args, "> 0", lambda v: v > 0, "brownian_dt", "vae_lr", "rnn_lr", "rnn_grad_clip", "temperature", "sigma0")


# Networks
class VAE(nn.Module):
    """V: four conv layers (32, 64, 128, 256 channels, kernel 4, stride 2, ReLU) → μ, log σ² of z; z → 1024 →
    transposed convs (128, 64, 32, 3 channels, kernels 5, 5, 6, 6, stride 2, ReLU, sigmoid): 64x64x3 in [0, 1].
    4,348,547 parameters at z 32, as the paper counts."""

    def __init__(self, z_size: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2), nn.ReLU(), nn.Conv2d(128, 256, 4, 2), nn.ReLU(), nn.Flatten(),
        )
        self.mu, self.logvar = nn.Linear(1024, z_size), nn.Linear(1024, z_size)
        self.dec_in = nn.Linear(z_size, 1024)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(1024, 128, 5, 2), nn.ReLU(), nn.ConvTranspose2d(128, 64, 5, 2), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 6, 2), nn.ReLU(), nn.ConvTranspose2d(32, 3, 6, 2), nn.Sigmoid(),
        )

    def encode(self, x):  # x: (N, 3, 64, 64) in [0, 1]
        # Channels-last convs are faster on a CPU for batches but slower for the single frame C acts on
        # (benchmarks/RESULTS.md), so one frame stays as it is. Same function either way.
        h = self.encoder(x if len(x) == 1 else x.contiguous(memory_format=torch.channels_last))
        return self.mu(h), self.logvar(h)

    def decode(self, z):
        # The first transposed conv sees a 1x1 map, where it is exactly a dense layer: computed as one matmul
        # with its own weights (same result; PyTorch's CPU conv-transpose kernel is much slower on this shape).
        first = self.decoder[0]
        x = self.dec_in(z) @ first.weight.flatten(1)  # (N, 1024) @ (1024, 128·5·5)
        x = x.view(-1, first.out_channels, 5, 5) + first.bias.view(1, -1, 1, 1)
        return self.decoder[1:](x.contiguous(memory_format=torch.channels_last))

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.exp(logvar / 2) * torch.randn_like(mu)
        return self.decode(z), mu, logvar


class MDNRNN(nn.Module):
    """M: LSTM over (z_t, a_t); from h_{t+1} a mixture of `mixtures` Gaussians for each dimension of z_{t+1}
    (log mixing weights, means, log stds), plus, in dream mode, r_{t+1} and the logit of done_{t+1}.
    At z 32, LSTM 256, 5 mixtures: the paper's 422,368 parameters plus 1,024, because PyTorch's LSTM keeps two
    bias vectors where TensorFlow's keeps one (only their sum matters), plus 1,024 inert ones for the zero input
    described in `lstm_input`."""

    def __init__(self, z_size: int, action_dim: int, hidden: int, mixtures: int, reward_done: bool = False):
        super().__init__()
        self.z_size, self.mixtures, self.reward_done = z_size, mixtures, reward_done
        self.input_pad = (z_size + action_dim) % 2
        self.lstm = nn.LSTM(z_size + action_dim + self.input_pad, hidden, batch_first=True)
        with torch.no_grad():  # forget-gate bias 1 (TensorFlow's BasicLSTMCell adds forget_bias = 1)
            self.lstm.bias_ih_l0[hidden:2 * hidden].fill_(1.0)
            self.lstm.bias_hh_l0[hidden:2 * hidden].zero_()
            self.lstm.weight_ih_l0[:, z_size + action_dim:].zero_()  # the zero input's weights (see lstm_input)
        self.mdn = nn.Linear(hidden, z_size * mixtures * 3 + (2 if reward_done else 0))

    def lstm_input(self, z, a):
        """[z_t, a_t] as the LSTM reads it, with one constant 0 appended when z + a has an odd width (32 + 3 here).
        Same model: a zero input adds nothing to the gates, and its weights get exactly zero gradient, so they stay
        at their initial 0. The reason is speed alone: on a CPU with AMX, oneDNN runs the forward of a bf16 LSTM
        whose input width is odd through a kernel without AMX; on one such CPU the M update went 9.5 → 7.6 ms
        with the even width (benchmarks/RESULTS.md). It is part of the weights' shape, so it stays on CUDA too
        (one inert input column of 36): gated by device, a checkpoint could not move between a CPU and a GPU."""
        return torch.cat([z, a, z.new_zeros(*z.shape[:-1], self.input_pad)], -1)  # width 0 when z + a is even

    def forward(self, z, a, state=None):
        """z (B, T, z), a (B, T, A) → (logmix, mean, logstd) each (B, T, K, z), reward (B, T), done logit (B, T), state."""
        h, state = self.lstm(self.lstm_input(z, a), state)
        return (*self.head(h), state)

    def head(self, h):
        """The linear output read as [log π | μ | log σ], each K × z: a permutation of the official per-dimension
        layout (same model), chosen so that the mixture axis is not the innermost one (4x faster loss on a CPU)."""
        out = self.mdn(h)
        B, T = h.shape[:2]
        mix = out[..., : self.z_size * self.mixtures * 3].reshape(B, T, 3, self.mixtures, self.z_size)
        logmix, mean, logstd = mix.unbind(2)
        reward = out[..., -2] if self.reward_done else None
        done = out[..., -1] if self.reward_done else None
        return F.log_softmax(logmix, -2), mean, logstd, reward, done


# Losses and sampling
def vae_loss(recon, x, mu, logvar, kl_tolerance: float):
    """Reconstruction: Σ_pixels (x − x̂)², averaged over frames; KL(q(z|x) ‖ N(0, I)) per frame in closed form,
    −½ Σ (1 + log σ² − μ² − σ²), floored at kl_tolerance · z_size (the official KL tolerance), then averaged."""
    r_loss = (x - recon).pow(2).sum((1, 2, 3)).mean()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
    kl_loss = kl.clamp(min=kl_tolerance * mu.shape[-1]).mean()
    return r_loss + kl_loss, r_loss, kl.mean()


LOG_SQRT_2PI = 0.5 * np.log(2 * np.pi)


def mdn_nll(logmix, mean, logstd, target):
    """−log Σ_k π_k N(y | μ_k, σ_k²) for each latent dimension separately, averaged over batch, time and dimension
    (the official get_lossfunc). logmix are normalised log weights (..., K, z); mean, logstd (..., K, z); target (..., z)."""
    y = target.unsqueeze(-2)
    log_normal = -0.5 * ((y - mean) * torch.exp(-logstd)).pow(2) - logstd - LOG_SQRT_2PI
    return -torch.logsumexp(logmix + log_normal, -2).mean()


def mdn_sample(logmix, mean, logstd, temperature: float):
    """One z_{t+1} per dimension at temperature τ (official sample_sequence): component k with probability
    softmax(log π / τ), then μ_k + σ_k √τ ε. As τ → 0 this is the mean of the most likely component.
    Inputs (..., K, z); returns (..., z)."""
    probs = F.softmax(logmix / temperature, -2).transpose(-1, -2)  # (..., z, K)
    k = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1]).unsqueeze(-2)  # (..., 1, z)
    mu, log_sigma = mean.gather(-2, k).squeeze(-2), logstd.gather(-2, k).squeeze(-2)
    return mu + log_sigma.exp() * np.sqrt(temperature) * torch.randn_like(mu)


def sample_z(mu, logvar):
    return mu + torch.exp(logvar / 2) * torch.randn_like(mu)


def mdn_batch(series: list[dict], batch_size: int, seq_len: int, rng: np.random.Generator) -> dict:
    """Random windows of encoded episodes for M, with the replay alignment of common/replay.py:

        row       :  t          t+1
        z         :  z_t        z_{t+1}          inputs z[t], targets z[t+1]
        action    :  (a_{t-1})  a_t              the action taken at frame t is stored in row t+1
        reward    :             r_{t+1}          earned by a_t, stored with frame t+1
    so the input at step t is (z_t, action[t+1]) and the targets are z_{t+1}, reward[t+1], terminated[t+1].
    Each window holds seq_len + 1 rows of one episode (episodes shorter than that are skipped): mu and logvar keep
    all seq_len + 1 rows (z is sampled once per frame, see mdn_inputs_targets), action, reward and done the last
    seq_len.
    """
    long = [s for s in series if len(s["mu"]) > seq_len]
    if not long:
        raise ValueError(f"No encoded episode is longer than --rnn-seq-len {seq_len}.")
    picks = rng.integers(0, len(long), batch_size)
    out = {k: [] for k in ("mu", "logvar", "action", "reward", "terminated")}
    for i in picks:
        s = long[i]
        t0 = rng.integers(0, len(s["mu"]) - seq_len)
        for k in out:
            out[k].append(s[k][t0 : t0 + seq_len + 1])
    w = {k: np.stack(v) for k, v in out.items()}
    return dict(mu=w["mu"], logvar=w["logvar"], action=w["action"][:, 1:], reward=w["reward"][:, 1:],
                done=w["terminated"][:, 1:].astype(np.float32))


def mdn_inputs_targets(batch: dict):
    """One z per frame sampled from V's posterior over the window's seq_len + 1 rows; M reads z[:-1] and predicts
    z[1:], so the target z_{t+1} is the same draw M is fed at the next step (official rnn_train.py: raw_z[:, :-1]
    in, raw_z[:, 1:] out)."""
    z = sample_z(batch["mu"], batch["logvar"])
    return z[:, :-1], z[:, 1:]


def mdn_loss(rnn: MDNRNN, batch: dict):
    """M's loss on one batch: the mixture NLL of z_{t+1} given (z_t, a_t) and h_t; in dream mode plus the MSE of
    r_{t+1} and the cross-entropy of done_{t+1}."""
    z, z_next = mdn_inputs_targets(batch)
    logmix, mean, logstd, reward, done, _ = rnn(z, batch["action"])
    nll = mdn_nll(logmix.float(), mean.float(), logstd.float(), z_next)
    metrics = dict(mdn_nll=nll)
    loss = nll
    if rnn.reward_done:
        metrics["reward_mse"] = (reward.float() - batch["reward"]).pow(2).mean()
        metrics["done_bce"] = F.binary_cross_entropy_with_logits(done.float(), batch["done"])
        loss = loss + metrics["reward_mse"] + metrics["done_bce"]
    return loss, metrics


def vae_update(vae: VAE, opt, x, args: Args, check) -> tuple:
    """One update of V on frames x (N, 3, 64, 64) in [0, 1]; `check(loss)` (the non-finite guard) runs before the
    step. Returns (loss, reconstruction loss, KL)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        recon, mu, logvar = vae(x)
    loss, r_loss, kl = vae_loss(recon.float(), x, mu.float(), logvar.float(), args.kl_tolerance)
    check(loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, r_loss, kl


def mdn_update(rnn: MDNRNN, opt, batch: dict, args: Args, check) -> dict:
    """One update of M on a batch of mdn_batch windows: loss, `check(loss)`, backward, gradients clipped by value
    to ±rnn_grad_clip (official), Adam step. Returns the loss terms."""
    with torch.autocast(batch["mu"].device.type, dtype=torch.bfloat16, enabled=args.bf16):
        loss, metrics = mdn_loss(rnn, batch)
    check(loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_value_(rnn.parameters(), args.rnn_grad_clip, foreach=True)
    opt.step()
    return metrics


# Acting: the controller C and rollouts
def controller_size(z_size: int, rnn_size: int, action_dim: int = 3) -> int:
    return (z_size + rnn_size) * action_dim + action_dim


def controller_action(params, z, h):
    """a = W [z, h] + b, squashed as officially (steer tanh, gas (tanh + 1)/2, brake clip(tanh, 0, 1)) and then
    mapped into the env's unit box [-1, 1]^3. params: (P,) laid out [b (3), W (z + h, 3)] as officially, or
    (N, P) with one row per trajectory; z (N, z), h (N, h) tensors."""
    params = torch.as_tensor(params, dtype=torch.float32, device=z.device)
    params = params.expand(z.shape[0], -1) if params.dim() == 1 else params
    b, W = params[:, :3], params[:, 3:].view(z.shape[0], -1, 3)
    a = torch.tanh(torch.bmm(torch.cat([z, h], -1).unsqueeze(1), W).squeeze(1) + b)
    steer, gas, brake = a[:, 0], (a[:, 1] + 1) / 2, a[:, 2].clamp(0, 1)
    return torch.stack([steer, 2 * gas - 1, 2 * brake - 1], -1)


def brownian_actions(rng: np.random.Generator, steps: int, dt: float, action_dim: int = 3) -> np.ndarray:
    """The random data policy: a_0 ~ U[-1, 1], a_{t+1} = clip(a_t + √dt ε, -1, 1): smooth, so the car drives."""
    a = [rng.uniform(-1, 1, action_dim)]
    for _ in range(steps - 1):
        a.append(np.clip(a[-1] + np.sqrt(dt) * rng.standard_normal(action_dim), -1, 1))
    return np.asarray(a, np.float32)


def frames_to_tensor(obs, device="cpu"):
    return torch.as_tensor(np.asarray(obs), device=device).float().div(255.0)


@torch.no_grad()
def controller_act(vae: VAE, rnn: MDNRNN, params, obs, h, state):
    """One frame of acting: z_t sampled from V(o_t), a_t = C(z_t, h_t), and M's next state h_{t+1} = LSTM(z_t, a_t)
    (it does not depend on the env's answer, so it is computed here). Returns (a_t, h_{t+1}, LSTM state)."""
    z = sample_z(*vae.encode(frames_to_tensor(obs)[None]))
    action = controller_action(params, z, h)
    out, state = rnn.lstm(rnn.lstm_input(z, action)[:, None], state)
    return action, out[:, 0], state


def run_controller(env, vae: VAE, rnn: MDNRNN, params, seed: int, max_steps: int) -> float:
    """One real episode of C with V and M; returns its return."""
    obs, _ = env.reset(seed=seed)
    h, state = torch.zeros(1, rnn.lstm.hidden_size), None
    total = 0.0
    for _ in range(max_steps):
        action, h, state = controller_act(vae, rnn, params, obs, h, state)
        obs, reward, terminated, truncated, _ = env.step(action[0].numpy())
        total += float(reward)
        if terminated or truncated:
            break
    return total


# Worker processes: each builds its own env (and V and M for the controller) once
_WORKER: dict = {}


def _init_worker(args_dict: dict, vae_state=None, rnn_state=None):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    torch.set_num_threads(1)
    args = Args(**args_dict)
    _WORKER["args"] = args
    _WORKER["env"] = make_env(args.env_id, args.seed)
    if vae_state is not None:
        _WORKER["vae"] = VAE(args.z_size).eval()
        _WORKER["vae"].load_state_dict(vae_state)
        _WORKER["rnn"] = MDNRNN(args.z_size, 3, args.rnn_size, args.num_mixtures, args.dream).eval()
        _WORKER["rnn"].load_state_dict(rnn_state)


def _collect_rollout(task) -> tuple[int, int, float]:
    """Stage 1 task: rollout k with the brownian policy, written as one episode file; returns (k, rows, return)."""
    k, directory = task
    args, env = _WORKER["args"], _WORKER["env"]
    rng = np.random.default_rng(args.seed * 1_000_003 + k)
    actions = brownian_actions(rng, args.max_episode_steps, args.brownian_dt)
    obs, _ = env.reset(seed=args.seed * 1_000_003 + k)
    rows = dict(obs=[obs], action=[np.zeros(3, np.float32)], reward=[0.0], terminated=[False], truncated=[False],
                is_first=[True])
    for t, action in enumerate(actions):
        obs, reward, terminated, truncated, _ = env.step(action)
        truncated = truncated or t == len(actions) - 1
        for key, v in zip(rows, (obs, action, reward, terminated, truncated, False)):
            rows[key].append(v)
        if terminated or truncated:
            break
    episode = dict(obs=np.asarray(rows["obs"], np.uint8), action=np.asarray(rows["action"], np.float32),
                   reward=np.asarray(rows["reward"], np.float32), terminated=np.asarray(rows["terminated"]),
                   truncated=np.asarray(rows["truncated"]), is_first=np.asarray(rows["is_first"]))
    save_episode(os.path.join(directory, f"{k:06d}-{len(episode['obs'])}.npz"), episode)
    return k, len(episode["obs"]), float(episode["reward"].sum())


def _controller_return(task) -> float:
    params, seed, max_steps = task
    return run_controller(_WORKER["env"], _WORKER["vae"], _WORKER["rnn"], params, seed, max_steps)


class Stopped(Exception):
    pass


def pool_results(iterator, stop: list):
    """Results of pool.imap(_unordered) as they come, checking `stop` every second: a stop request (or workers
    killed by a signal sent to the whole process group, whose tasks would never return) ends the wait."""
    while True:
        try:
            yield iterator.next(timeout=1.0)
        except StopIteration:
            return
        except mp.TimeoutError:
            pass
        if stop:
            raise Stopped


@torch.no_grad()
def dream_fitness(rnn: MDNRNN, params: np.ndarray, z0: torch.Tensor, max_steps: int, temperature: float) -> np.ndarray:
    """Dream mode: every candidate (rows of params, each repeated for the rows of z0) rolled out inside M at
    temperature τ, with M's predicted rewards, until M predicts done (p > 0.5) or max_steps. Returns the mean
    return per candidate."""
    P, R = len(params), len(z0)
    theta = torch.as_tensor(params, dtype=torch.float32).repeat_interleave(R, 0)  # (P·R, size)
    z = z0.repeat(P, 1)
    h, state = torch.zeros(P * R, rnn.lstm.hidden_size), None
    alive, total = torch.ones(P * R), torch.zeros(P * R)
    for _ in range(max_steps):
        action = controller_action(theta, z, h)
        out, state = rnn.lstm(rnn.lstm_input(z, action)[:, None], state)
        h = out[:, 0]
        logmix, mean, logstd, reward, done = rnn.head(out)
        total += alive * reward[:, 0]
        alive = alive * (torch.sigmoid(done[:, 0]) <= 0.5).float()
        z = mdn_sample(logmix[:, 0], mean[:, 0], logstd[:, 0], temperature)
        if not alive.any():
            break
    return total.view(P, R).mean(1).numpy()


# Data access
def episode_files(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "episodes", "[0-9]" * 6 + "-*.npz")))


def encode_episodes(vae: VAE, run_dir: str, device) -> list[dict]:
    """Every stored episode encoded by V into runs/<run>/series/ (μ, log σ², actions, rewards, terminals), reusing
    files written earlier; returns them all."""
    os.makedirs(os.path.join(run_dir, "series"), exist_ok=True)
    series = []
    for path in episode_files(run_dir):
        out = os.path.join(run_dir, "series", os.path.basename(path))
        if not os.path.exists(out):
            ep = load_episode(path)
            with torch.no_grad():
                mu, logvar = zip(*(vae.encode(frames_to_tensor(ep["obs"][i:i + 500], device))
                                   for i in range(0, len(ep["obs"]), 500)))
            save_episode(out, dict(mu=torch.cat(mu).cpu().numpy(), logvar=torch.cat(logvar).cpu().numpy(),
                                   action=ep["action"], reward=ep["reward"], terminated=ep["terminated"]))
        series.append(load_episode(out))
    return series


@torch.no_grad()
def openloop_video(vae: VAE, rnn: MDNRNN, episode: dict, temperature: float, context: int = 10, length: int = 60):
    """Real frames (top), V's reconstructions (middle), and M's dream (bottom): M reads the first `context`
    encoded frames and the real actions, then continues on its own samples at temperature τ with the real actions."""
    obs = frames_to_tensor(episode["obs"][:length])
    action = torch.as_tensor(episode["action"][1:length + 1])  # action[t + 1] was taken at frame t
    mu, logvar = vae.encode(obs)
    recon = vae.decode(mu)
    z, state, dream = sample_z(mu[:1], logvar[:1]), None, [recon[0]]
    for t in range(len(obs) - 1):
        logmix, mean, logstd, _, _, state = rnn(z[:, None], action[t:t + 1][:, None], state)
        z = mdn_sample(logmix[:, 0], mean[:, 0], logstd[:, 0], temperature) if t + 1 >= context else \
            sample_z(mu[t + 1:t + 2], logvar[t + 1:t + 2])
        dream.append(vae.decode(z)[0])
    video = torch.cat([obs, recon, torch.stack(dream)], 2)  # (T, 3, 3·64, 64)
    return (video.clamp(0, 1) * 255).to(torch.uint8)


# The four stages
def stage_data(args: Args, run_dir: str, writer, stop: list) -> bool:
    """Stage 1: collect the missing rollouts in parallel; True when all are on disk."""
    directory = os.path.join(run_dir, "episodes")
    os.makedirs(directory, exist_ok=True)
    have = {int(re.match(r"(\d{6})-", os.path.basename(f)).group(1)) for f in episode_files(run_dir)}
    todo = [(k, directory) for k in range(args.num_rollouts) if k not in have]
    print(f"data: {len(have)} of {args.num_rollouts} rollouts on disk, collecting {len(todo)} with "
          f"{args.num_workers} workers")
    if todo:
        start, steps = time.time(), 0
        with mp.get_context("spawn").Pool(args.num_workers, _init_worker, (vars(args),)) as pool:
            results = pool_results(pool.imap_unordered(_collect_rollout, todo), stop)
            for i, (k, rows, ret) in enumerate(results):  # leaving the block terminates the workers
                steps += rows - 1
                writer.add_scalar("charts/episodic_return", ret, k)
                if (i + 1) % max(1, len(todo) // 20) == 0 or i + 1 == len(todo):
                    sps = steps / (time.time() - start)
                    print(f"data: {len(have) + i + 1}/{args.num_rollouts} rollouts, {sps:.0f} env steps/s", flush=True)
        writer.add_scalar("perf/data_env_steps_per_s", steps / (time.time() - start), 0)
    return True


def stage_vae(args: Args, vae: VAE, opt, state: dict, run_dir: str, writer, device, stop: list, save) -> bool:
    """Stage 2: V over every stored frame for vae_epochs epochs, streamed in shuffled chunks of episodes."""
    files = episode_files(run_dir)
    rng = np.random.default_rng(args.seed + 2)
    orders = [rng.permutation(len(files)) for _ in range(args.vae_epochs)]  # fixed up front: resumable
    chunk = args.vae_chunk_episodes
    while state["vae_epoch"] < args.vae_epochs:
        order = orders[state["vae_epoch"]]
        while state["vae_chunk"] * chunk < len(files):
            picked = order[state["vae_chunk"] * chunk:(state["vae_chunk"] + 1) * chunk]
            frames = np.concatenate([load_episode(files[i])["obs"] for i in picked])
            frames = frames[np.random.default_rng(args.seed + 7919 * state["vae_updates"]).permutation(len(frames))]
            for b in range(len(frames) // args.vae_batch_size):
                x = frames_to_tensor(frames[b * args.vae_batch_size:(b + 1) * args.vae_batch_size], device)
                loss, r_loss, kl = vae_update(vae, opt, x, args,
                                              lambda loss: check_finite({"vae_loss": loss}, state["vae_updates"], save))
                state["vae_updates"] += 1
                if stop:  # the weights so far are kept; the chunk is repeated on resume
                    return False
                if state["vae_updates"] % args.log_every == 0:
                    for name, v in (("vae_loss", loss), ("vae_recon", r_loss), ("vae_kl", kl)):
                        writer.add_scalar(f"losses/{name}", v.item(), state["vae_updates"])
                    print(f"vae: epoch {state['vae_epoch'] + 1}/{args.vae_epochs} update {state['vae_updates']} "
                          f"loss {loss.item():.1f} (recon {r_loss.item():.1f}, KL {kl.item():.2f})", flush=True)
            state["vae_chunk"] += 1  # a chunk is the unit of resumption: a kill repeats at most one chunk
            save()
        state["vae_epoch"], state["vae_chunk"] = state["vae_epoch"] + 1, 0
    with torch.no_grad():
        x = frames_to_tensor(load_episode(files[0])["obs"][:8], device)
        writer.add_image("media/vae_reconstruction", torch.cat([torch.cat(list(x), 2), torch.cat(list(vae(x)[0]), 2)], 1),
                         state["vae_updates"])
    return True


def stage_mdnrnn(args: Args, vae: VAE, rnn: MDNRNN, opt, state: dict, run_dir: str, writer, device, stop: list,
                 save) -> bool:
    """Stage 3: encode every episode with V, then rnn_steps updates of M on windows of sampled z."""
    vae.eval()
    series = encode_episodes(vae, run_dir, device)
    rng = np.random.default_rng(args.seed + 3 + state["rnn_updates"])
    while state["rnn_updates"] < args.rnn_steps:
        batch = to_device(mdn_batch(series, args.rnn_batch_size, args.rnn_seq_len, rng), device)
        metrics = mdn_update(rnn, opt, batch, args,
                             lambda loss: check_finite({"mdn_loss": loss}, state["rnn_updates"], save))
        state["rnn_updates"] += 1
        if state["rnn_updates"] % args.log_every == 0:
            for k, v in metrics.items():
                writer.add_scalar(f"losses/{k}", v.item(), state["rnn_updates"])
            print(f"mdnrnn: update {state['rnn_updates']}/{args.rnn_steps} NLL {metrics['mdn_nll'].item():.3f}", flush=True)
        if state["rnn_updates"] % args.checkpoint_every == 0:
            save()
        if stop:
            return False
    episode = load_episode(episode_files(run_dir)[0])
    add_video(writer, "media/openloop", openloop_video(vae.cpu(), rnn.cpu(), episode, args.temperature).numpy(),
              state["rnn_updates"])
    vae.to(device), rnn.to(device)
    return True


def evaluate(args: Args, params, episodes: int, pool, stop: list) -> list[float]:
    """The controller on `episodes` full real episodes (the env's own 1,000-step limit), in the workers."""
    tasks = [(params, 10_000 + args.seed * 1_000 + i, 10**9) for i in range(episodes)]
    return list(pool_results(pool.imap(_controller_return, tasks), stop))


def stage_controller(args: Args, vae: VAE, rnn: MDNRNN, state: dict, run_dir: str, writer, stop: list, save) -> bool:
    """Stage 4: CMA-ES over C's parameters (Algorithm: ask, evaluate 16 rollouts each, tell); then evaluation."""
    size = controller_size(args.z_size, args.rnn_size)
    if state["es"] is None:
        es = cma.CMAEvolutionStrategy(np.zeros(size), args.sigma0, {"popsize": args.population, "seed": args.seed + 4,
                                                                   "verbose": -9})
        state["es"] = pickle.dumps(es)
    vae_state = {k: v.cpu() for k, v in vae.state_dict().items()}
    rnn_state = {k: v.cpu() for k, v in rnn.state_dict().items()}
    z0 = None
    if args.dream:  # dream rollouts start from the encoded first frames of stored rollouts
        first = np.stack([load_episode(f)["obs"][0] for f in episode_files(run_dir)[: args.rollouts_per_candidate]])
        with torch.no_grad():
            z0 = sample_z(*vae.cpu().encode(frames_to_tensor(first)))
    with mp.get_context("spawn").Pool(args.num_workers, _init_worker, (vars(args), vae_state, rnn_state)) as pool:
        while state["generation"] < args.generations:
            es = pickle.loads(state["es"])
            t0 = time.time()
            solutions = np.asarray(es.ask())
            if args.dream:
                fitness = dream_fitness(rnn.cpu(), solutions, z0, args.max_episode_steps, args.temperature)
            else:
                seeds = [args.seed * 1_000_003 + state["generation"] * args.rollouts_per_candidate + j
                         for j in range(args.rollouts_per_candidate)]  # the same tracks for every candidate
                tasks = [(x, s, args.max_episode_steps) for x in solutions for s in seeds]
                chunks = max(1, args.rollouts_per_candidate // 2)
                returns = list(pool_results(pool.imap(_controller_return, tasks, chunksize=chunks), stop))
                fitness = np.asarray(returns).reshape(len(solutions), -1).mean(1)
            es.tell(list(solutions), list(-fitness))  # CMA-ES minimises
            g = state["generation"] = state["generation"] + 1
            if fitness.max() > state["best_fitness"]:
                state["best_fitness"], state["best_params"] = float(fitness.max()), solutions[fitness.argmax()].copy()
            state["es"] = pickle.dumps(es)
            state["history"].append((float(fitness.max()), float(fitness.mean()), float(fitness.min())))
            for name, v in zip(("best", "mean", "worst"), state["history"][-1]):
                writer.add_scalar(f"charts/fitness_{name}", v, g)
            writer.add_scalar("perf/generation_s", time.time() - t0, g)
            print(f"controller: generation {g}/{args.generations} fitness best {fitness.max():.1f} mean "
                  f"{fitness.mean():.1f} ({time.time() - t0:.1f} s)", flush=True)
            save()
            if stop:
                return False
        if args.eval_episodes > 0 and state["eval_returns"] is None:
            returns = evaluate(args, state["best_params"], args.eval_episodes, pool, stop)
            state["eval_returns"] = returns
            for i, r in enumerate(returns):
                writer.add_scalar("eval/episodic_return", r, i)
            print(f"eval: best controller {np.mean(returns):.1f} ± {np.std(returns):.1f} over {len(returns)} episodes")
            save()
    if args.capture_video:  # one episode of the best controller, rendered, in this process
        env = make_env(args.env_id, args.seed, capture_video=True, video_dir=os.path.join(run_dir, "videos"))
        run_controller(env, vae.cpu(), rnn.cpu(), state["best_params"], 10_000 + args.seed * 1_000, 10**9)
        env.close()
    return True


# Main: run the stages in order, skipping finished ones
def main(args: Args):
    check_args(args)
    if args.stage not in ("all", *STAGES):
        raise SystemExit(f"--stage must be one of all, {', '.join(STAGES)}; got '{args.stage}'.")
    try:  # a bad env id or space stops here, before a run directory is made
        env = make_env(args.env_id, args.seed)
        if not isinstance(env.action_space, gym.spaces.Box) or env.action_space.shape != (3,) or \
                env.observation_space.shape != (3, 64, 64):
            raise ValueError(f"World Models here is built for CarRacing's 64x64 RGB frames and 3-dim continuous "
                             f"actions; '{args.env_id}' has {env.observation_space.shape} frames and actions "
                             f"{env.action_space}.")
        env.close()
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.stage not in ("all", "data") and not args.resume:
        raise SystemExit(f"--stage {args.stage} continues an earlier run: pass --resume runs/<run> as well.")
    args.num_workers = args.num_workers or os.cpu_count() or 1
    run_dir, resumed = open_run(args)
    seed_everything(args.seed, args.torch_deterministic)
    device = choose_device(args.cuda)

    vae = VAE(args.z_size).to(device)
    rnn = MDNRNN(args.z_size, 3, args.rnn_size, args.num_mixtures, args.dream).to(device)
    vae_opt = torch.optim.Adam(vae.parameters(), args.vae_lr, fused=True)  # fused: one kernel, same update
    rnn_opt = torch.optim.Adam(rnn.parameters(), args.rnn_lr, fused=True)
    state = dict(done=[], vae_epoch=0, vae_chunk=0, vae_updates=0, rnn_updates=0, es=None, generation=0,
                 best_fitness=-np.inf, best_params=None, history=[], eval_returns=None)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resumed:
        ckpt = load_checkpoint(ckpt_path, device, vae=vae, rnn=rnn, vae_opt=vae_opt, rnn_opt=rnn_opt)
        state.update(ckpt["state"])
        print(f"resumed {run_dir}: finished stages {', '.join(state['done']) or 'none'}")
    writer = make_writer(run_dir, args, resumed)
    print(f"run: {run_dir}  preset: {args.preset}  workers {args.num_workers}  controller parameters "
          f"{controller_size(args.z_size, args.rnn_size)}")

    def save():
        if args.save_model:
            save_checkpoint(ckpt_path, dict(vae=vae.state_dict(), rnn=rnn.state_dict(), vae_opt=vae_opt.state_dict(),
                                            rnn_opt=rnn_opt.state_dict(), state=state,
                                            args=vars(args)))
        return ckpt_path

    stop = []  # SIGTERM / Ctrl-C set this; each stage stops at its next safe point and everything is saved
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))

    run = STAGES if args.stage == "all" else (args.stage,)
    for stage in run:
        if stage in state["done"] and args.stage == "all":
            print(f"{stage}: finished earlier, skipped")
            continue
        missing = [s for s in STAGES[: STAGES.index(stage)] if s not in state["done"]]
        if missing:
            raise SystemExit(f"Stage '{stage}' needs the stage(s) {', '.join(missing)} first; run --stage all.")
        t0 = time.time()
        try:
            if stage == "data":
                finished = stage_data(args, run_dir, writer, stop)
            elif stage == "vae":
                vae.train()
                finished = stage_vae(args, vae, vae_opt, state, run_dir, writer, device, stop, save)
            elif stage == "mdnrnn":
                finished = stage_mdnrnn(args, vae, rnn, rnn_opt, state, run_dir, writer, device, stop, save)
            else:
                vae.eval()
                finished = stage_controller(args, vae, rnn, state, run_dir, writer, stop, save)
        except Stopped:  # a generation or an evaluation cut short is dropped; CMA-ES continues from its last tell
            finished = False
        if not finished:
            save()
            print(f"interrupted in stage {stage}; everything up to here is saved. Continue with --resume {run_dir}")
            writer.close()
            sys.exit(130)
        if stage not in state["done"]:
            state["done"].append(stage)
        save()
        print(f"{stage}: finished in {time.time() - t0:.0f} s")
    writer.close()


if __name__ == "__main__":
    main(parse_args(Args, PRESETS, default_preset))
