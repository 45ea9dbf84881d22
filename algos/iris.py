"""IRIS: "Transformers are Sample-Efficient World Models", Micheli, Alonso, Fleuret (ICLR 2023), arXiv 2209.00588.

A discrete autoencoder (VQ-VAE) turns each frame into K = 16 tokens from a 512-entry codebook; a GPT
models the sequence of steps, each step a block of K observation tokens followed by one action token,
predicting the next token, the reward's sign and termination; an actor-critic (CNN + LSTM) learns
entirely on frames decoded from tokens the transformer imagines. Training alternates, epoch by epoch
(Algorithm 1): collect 200 steps in the real env, then train the tokenizer, the world model and the
actor-critic for 200 updates each (each from its own start epoch).

Run:  python algos/iris.py --env-id ALE/Pong-v5                 (atari preset: Atari 100k, GPU)
      python algos/iris.py --env-id MinAtar/Breakout-v1         (small preset, CPU)
      python algos/iris.py --resume runs/<run_name> --env-id ...  (continue a stopped run)
The preset is chosen from the env id (atari for ALE/, small otherwise) or with --preset; every flag
given explicitly wins over the preset.

The alignment of one step in the world model's token sequence (K = 16 observation tokens per frame):

    block t      :  [ o_t^1 ... o_t^K  a_t ] [ o_{t+1}^1 ... ]
    heads        :    obs head at o_t^1..o_t^{K-1} predicts o_t^2..o_t^K; obs head at a_t predicts o_{t+1}^1;
                      reward and termination heads read a_t's output: r_t, d_t are what taking a_t in o_t gave.
    replay rows  :  obs row s+t  |  action, reward, terminated rows s+t+1   (common/replay.py's table)

Deviations from the paper / official code (eloialonso/iris):
 1. No perceptual (LPIPS) loss by default: its VGG16 weights cannot be downloaded here. `--perceptual-weights
    PATH` turns it on, taking a state dict in the layout of taming-transformers' LPIPS (`net.slice1.0.weight`
    … `lin4.model.1.weight`, `scaling_layer.shift/scale`) holding the VGG16 and the calibrated linear layers.
 2. Termination labels are the env's `terminated` only; the official code also ends an episode (label 1) at a
    time limit. A truncated episode is not a terminal state, so its last step is labelled 0 here.
 3. Episodes are sampled uniformly. The official config names sampling weights [0.125, 0.125, 0.25, 0.5]
    over the dataset's quarters, but its sampler applies them only while the dataset holds at most four
    episodes (`num_weights < num_episodes` falls back to uniform), so official runs sample uniformly too.
 4. The world model's padded positions hold copies of the nearest real frame instead of zero frames; their
    labels are ignored (-100) as officially, and causality keeps them from touching unpadded outputs.
 5. The `small` preset (CPU) is ours: MinAtar frames (10×10, C object channels) zero-padded to 12×12 and
    tokenized into 3×3 tokens of 4×4 patches; a 3-layer transformer of width 128 without dropout (PyTorch's
    fused CPU attention has no attention-probability dropout, and the unfused path doubled the world-model
    update); horizon and burn-in 20 as in the paper; per 400-step epoch 100 tokenizer, 120 world-model and 20
    actor-critic updates instead of 200 each per 200 steps, learning rate 1e-3 instead of 1e-4 for the world
    model and the actor-critic, and 32 imagined trajectories per actor-critic batch instead of 64 (all to learn
    within 30 CPU minutes: with 3e-4 and 10 actor-critic updates the policy stayed near uniform, entropy 1.07
    after 45 epochs). Its tokenizer differs in five ways, each needed for MinAtar's one-pixel paddle and ball
    (offline on Breakout frames; benchmarks/RESULTS.md): a patch encoder (`--encoder patch`: each token's
    vector from its own 4×4 patch alone, no group norm or attention across patches), because the official
    encoder's 3×3 convolutions, frame-wide group norm and attention gave one patch content up to 31 different
    tokens depending on its neighbours, which the world model cannot predict (its token accuracy stayed at
    0.2-0.5; with the patch encoder every content has one token and it reached 0.85-0.9); a Bernoulli
    likelihood (`--reconstruction bernoulli`: the decoder outputs logits, the loss is their cross-entropy,
    decoded frames are their sigmoid) instead of L1, whose minimiser is the median and so 'off' for any pixel
    that is on less than half the time (even a plain autoencoder with L1 or squared error lost every paddle
    pixel); 16-dimensional codes instead of 512 (with 64 dimensions every grid position kept one token); the
    codebook restart of deviation 6; and learning rate 3e-4 (1e-4 officially). At 1e-3 it learned faster but
    kept handing patch contents new tokens: the empty patch's token changed in every 100-update phase and
    30-99% of all tokens of fixed frames changed from one phase to the next until ~2,000 updates, so the world
    model kept relearning its vocabulary; at 3e-4 at most 2.4% changed per phase after the first restarts,
    and at 1e-4 the ball was still 89% lost after 2,000 updates (benchmarks/iris_token_churn.py; the run logs
    this as tokenizer/tokens_changed). The actor-critic's CNN keeps the official 4×4×64 = 1024 features by
    using ceil(log2(res/4)) conv+pool layers (4 at 64×64, 2 at 16×16 and at 12×12, where 3×3×64 = 576
    features remain).
 6. `--codebook-restart` (off by default, on in the small preset) is not in IRIS: codes not picked in 500
    tokenizer updates are moved onto the encoder outputs the codebook fits worst (random restarts as in Jukebox,
    Dhariwal et al. 2020). On MinAtar the tokenizer otherwise gives some rare patch contents (the ball near the
    paddle) the token of a common one: 3.2% of ball pixels decoded wrong without, 0.3–1.4% with
    (benchmarks/RESULTS.md).
 7. `total_timesteps` counts env frames (400k = Atari 100k's 100k agent steps × frame skip 4) as every
    file here does; `final_epochs` are the official epochs 501–600, which train without collecting.
"""

# Imports
import math
import os
import signal
import sys
import time
from collections import OrderedDict, deque
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
    Progress, add_video, check_finite, choose_device, load_checkpoint, make_writer, open_run, parse_args, require,
    save_checkpoint, seed_everything, to_device,
)


# Hyperparameters (defaults: the paper's Atari 100k setting, official config/*.yaml)
@dataclass
class Args:
    exp_name: str = "iris"
    """name of this experiment (the file name)"""
    env_id: str = "ALE/Pong-v5"
    """environment id with image observations and discrete actions (ALE/*, MinAtar/*)"""
    preset: str = "atari"
    """atari | small; chosen from the env id unless given; explicit flags win over it"""
    seed: int = 0
    """seed of python, numpy, torch and the environment"""
    total_timesteps: int = 400_000
    """environment frames to collect (Atari 100k: 100k agent steps × frame skip 4)"""
    cuda: bool = True
    """use CUDA if available (fp32 matmuls and convolutions then run in TF32: float32_matmul_precision high)"""
    torch_deterministic: bool = False
    """torch.backends.cudnn.deterministic and deterministic algorithms"""
    bf16: bool = False
    """bf16 autocast for the forward passes, CUDA or a CPU with bf16 units (losses and optimizer state stay fp32)"""
    capture_video: bool = False
    """record every 10th training episode to runs/<run>/videos"""
    save_model: bool = True
    """write runs/<run>/checkpoint.pt every checkpoint_every epochs and at exit"""
    resume: str | None = None
    """a run directory to continue (same env id); its episodes are reloaded from disk"""
    eval_episodes: int = 16
    """evaluation episodes at the end of training (official test: 16, temperature 0.5, no life loss); 0: none"""
    log_every: int = 4_000
    """environment frames between progress lines"""
    video_every: int = 10
    """epochs between open-loop videos (media/openloop) once the world model trains; 0: none"""
    checkpoint_every: int = 1
    """epochs between checkpoints (a stop mid-epoch saves too)"""

    # environment
    action_repeat: int = 4
    """frame skip (Atari 4)"""
    life_loss: bool = True
    """Atari: the loss of a life ends the training episode (never at evaluation)"""
    resolution: int = 64
    """frames are resized (ALE) or zero-padded (MinAtar) to resolution × resolution"""

    # schedule (official trainer.yaml)
    steps_per_epoch: int = 200
    """agent steps collected per epoch"""
    final_epochs: int = 100
    """epochs that only train after collection stops (official: 600 epochs, collection stops after 500)"""
    tokenizer_start: int = 5
    """the tokenizer trains in epochs after this one"""
    world_model_start: int = 25
    """the world model trains in epochs after this one"""
    actor_critic_start: int = 50
    """the actor-critic trains in epochs after this one"""
    tokenizer_updates: int = 200
    """tokenizer gradient steps per epoch"""
    world_model_updates: int = 200
    """world-model gradient steps per epoch"""
    actor_critic_updates: int = 200
    """actor-critic gradient steps per epoch"""
    epsilon: float = 0.01
    """probability of a uniformly random action while collecting"""
    temperature: float = 1.0
    """softmax temperature of the policy while collecting"""
    eval_temperature: float = 0.5
    """softmax temperature of the policy at evaluation"""
    learning_rate: float = 1e-4
    """Adam learning rate of the world model and the actor-critic (and of the tokenizer unless given)"""
    tokenizer_learning_rate: float | None = None
    """Adam learning rate of the tokenizer; None: learning_rate"""
    actor_critic_learning_rate: float | None = None
    """Adam learning rate of the actor-critic; None: learning_rate"""
    grad_clip: float = 10.0
    """global gradient norm clip of each component"""

    # tokenizer (official config/tokenizer/default.yaml)
    vocab_size: int = 512
    """codebook entries N"""
    embed_dim: int = 512
    """codebook vector size"""
    z_channels: int = 512
    """channels of the encoder output / decoder input"""
    channels: int = 64
    """base channels of the encoder/decoder"""
    ch_mult: tuple[int, ...] = (1, 1, 1, 1, 1)
    """channel multiplier per resolution level; len - 1 downsamplings (64 -> 4: 16 tokens)"""
    res_blocks: int = 2
    """residual blocks per level (the decoder has one more)"""
    attn_resolutions: tuple[int, ...] = (8, 16)
    """resolutions at which self-attention blocks follow the residual blocks"""
    tokenizer_batch: int = 256
    """frames per tokenizer batch"""
    encoder: str = "taming"
    """taming (official: 3×3 convs, group norm, attention) | patch: each token's vector from its own patch alone
    (a patch-size stride-patch conv, then two 1×1 layers), so equal patches always get equal tokens (deviation 5)"""
    codebook_restart: bool = False
    """move codes not picked in 500 tokenizer updates onto the encoder outputs the codebook fits worst (not in
    IRIS; deviation 6)"""
    reconstruction: str = "l1"
    """l1 (official) | bernoulli: the decoder outputs logits of binary pixels and the loss is their cross-entropy
    (MinAtar's object channels; deviation 5)"""
    perceptual_weights: str | None = None
    """path to LPIPS weights (taming layout, deviation 1); None trains without the perceptual loss"""

    # world model (official config/world_model/default.yaml)
    max_blocks: int = 20
    """steps in the transformer's context (L); also the training sequence length"""
    layers: int = 10
    """transformer blocks"""
    heads: int = 4
    """attention heads"""
    embed: int = 256
    """transformer width"""
    dropout: float = 0.1
    """embedding and residual dropout"""
    attn_dropout: float = 0.1
    """dropout of the attention probabilities"""
    world_model_batch: int = 64
    """sequences per world-model batch"""
    weight_decay: float = 0.01
    """AdamW weight decay of the world model's linear weights"""

    # actor-critic (official trainer.yaml training.actor_critic)
    actor_critic_batch: int = 64
    """imagined trajectories per actor-critic batch"""
    horizon: int = 20
    """imagination horizon H"""
    burn_in: int = 20
    """real frames fed to the LSTM before imagination starts"""
    gamma: float = 0.995
    """discount γ"""
    lambda_: float = 0.95
    """λ of the λ-return"""
    entropy_weight: float = 0.001
    """weight of the policy entropy bonus"""


PRESETS = {
    "atari": {},
    "small": dict(
        total_timesteps=30_000, action_repeat=1, life_loss=False, resolution=12, final_epochs=0, tokenizer_start=2,
        world_model_start=3, actor_critic_start=5, steps_per_epoch=400, world_model_updates=120, actor_critic_updates=20,
        learning_rate=1e-3, tokenizer_learning_rate=3e-4, tokenizer_updates=100, actor_critic_batch=32,
        encoder="patch", reconstruction="bernoulli", codebook_restart=True, vocab_size=256, embed_dim=16, z_channels=64,
        channels=16, ch_mult=(1, 1, 1), res_blocks=1, attn_resolutions=(),
        tokenizer_batch=64, layers=3, heads=4, embed=128, dropout=0.0, attn_dropout=0.0, world_model_batch=16, eval_episodes=10,
        log_every=2_000, video_every=10,
    ),
}


def default_preset(env_id: str) -> str:
    return "atari" if env_family(env_id) == "atari" else "small"


def check_args(args: Args) -> None:
    """Each numeric flag in its range, before a run directory is made or an env built (common/run.py require)."""
    require(args, "≥ 1", lambda v: v >= 1, "total_timesteps", "log_every", "checkpoint_every", "action_repeat",
            "resolution", "steps_per_epoch", "vocab_size", "embed_dim", "z_channels", "channels", "res_blocks",
            "tokenizer_batch", "max_blocks", "layers", "heads", "embed", "world_model_batch", "actor_critic_batch")
    require(args, "≥ 2", lambda v: v >= 2, "horizon")
    require(args, f"a multiple of --heads ({args.heads})", lambda v: v % max(args.heads, 1) == 0, "embed")
    require(args, "≥ 0 (0: off)", lambda v: v >= 0, "eval_episodes", "video_every")
    require(args, "≥ 0", lambda v: v >= 0, "seed", "final_epochs", "tokenizer_start", "world_model_start",
            "actor_critic_start", "tokenizer_updates", "world_model_updates", "actor_critic_updates", "burn_in",
            "weight_decay", "entropy_weight")
    require(args, "> 0", lambda v: v > 0, "temperature", "eval_temperature", "learning_rate", "grad_clip")
    require(args, "> 0 (or not given: --learning-rate)", lambda v: v is None or v > 0, "tokenizer_learning_rate",
            "actor_critic_learning_rate")
    require(args, "in [0, 1]", lambda v: 0 <= v <= 1, "epsilon", "lambda_")
    require(args, "in [0, 1)", lambda v: 0 <= v < 1, "dropout", "attn_dropout")
    require(args, "in (0, 1]", lambda v: 0 < v <= 1, "gamma")


# Tokenizer: a VQ-VAE with the taming-transformers encoder/decoder (official src/models/tokenizer/nets.py)
class GroupNorm(nn.GroupNorm):
    """speed (CPU): nn.GroupNorm computed in its input's dtype. Under CPU bf16 autocast PyTorch runs group norm in
    fp32, and casting every activation back and forth took a third of the tokenizer's time; statistics still
    accumulate in fp32 inside the kernel. The plain form, autocast's own fp32 group norm, runs on CUDA."""

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def norm(c: int) -> nn.GroupNorm:
    return GroupNorm(min(32, c), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # official dropout is 0.0
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)  # the official q, k, v 1×1 convs as one
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Encoder(nn.Module):
    def __init__(self, in_ch: int, args: Args):
        super().__init__()
        ch, res = args.channels, args.resolution
        layers, c = [nn.Conv2d(in_ch, ch, 3, padding=1)], ch
        for level, mult in enumerate(args.ch_mult):
            for _ in range(args.res_blocks):
                layers.append(ResBlock(c, ch * mult))
                c = ch * mult
                if res in args.attn_resolutions:
                    layers.append(AttnBlock(c))
            if level != len(args.ch_mult) - 1:  # downsample: asymmetric pad (0, 1, 0, 1), 3×3 conv, stride 2
                layers += [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2)]
                res //= 2
        layers += [ResBlock(c, c), AttnBlock(c), ResBlock(c, c), norm(c), nn.SiLU(), nn.Conv2d(c, args.z_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def patch_encoder(in_ch: int, args: Args) -> nn.Sequential:
    """Each output position sees only its own P×P input patch (P = resolution / tokens per side) and no frame
    statistics: a P×P conv with stride P, then two 1×1 layers. The small preset's encoder (deviation 5)."""
    p, c = 2 ** (len(args.ch_mult) - 1), args.z_channels
    return nn.Sequential(nn.Conv2d(in_ch, c, p, stride=p), nn.SiLU(), nn.Conv2d(c, c, 1), nn.SiLU(), nn.Conv2d(c, c, 1))


class Decoder(nn.Module):
    def __init__(self, out_ch: int, args: Args):
        super().__init__()
        ch = args.channels
        c = ch * args.ch_mult[-1]
        res = args.resolution // 2 ** (len(args.ch_mult) - 1)
        layers = [nn.Conv2d(args.z_channels, c, 3, padding=1), ResBlock(c, c), AttnBlock(c), ResBlock(c, c)]
        for level in reversed(range(len(args.ch_mult))):
            for _ in range(args.res_blocks + 1):
                layers.append(ResBlock(c, ch * args.ch_mult[level]))
                c = ch * args.ch_mult[level]
                if res in args.attn_resolutions:
                    layers.append(AttnBlock(c))
            if level != 0:  # upsample: nearest ×2, then a 3×3 conv
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
                res *= 2
        layers += [norm(c), nn.SiLU(), nn.Conv2d(c, out_ch, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


# speed (CPU): frames per conv pass of the tokenizer on a CPU (without gradient, or per accumulated micro-batch). At
# the paper size one 64×64×64 bf16 activation of 32 frames is 16 MiB: under glibc's largest mmap threshold (32 MiB),
# so freed activations are reused; at 64 frames every activation was a fresh mmap, page-faulted in (decode 0.97 ->
# 0.67 s). On CUDA the caching allocator has no such cost: a batch goes through in one pass.
CHUNK = 32


def frames_per_pass(x) -> int:
    """speed (CPU): CHUNK frames per tokenizer pass on a CPU; the plain form, the whole batch at once, on CUDA."""
    return CHUNK if x.device.type == "cpu" else max(1, len(x))


# --codebook-restart: a code not picked in DEAD_AFTER tokenizer updates is dead; an encoder output is misfit when its
# squared distance to its code exceeds MISFIT × the batch's mean squared output norm
DEAD_AFTER, MISFIT = 500, 0.1


class Tokenizer(nn.Module):
    """Frames in [0, 1] (N, C, H, W) <-> K tokens each. Internally frames live in [-1, 1] as officially."""

    def __init__(self, channels: int, args: Args):
        super().__init__()
        self.encoder = Encoder(channels, args) if args.encoder == "taming" else patch_encoder(channels, args)
        self.pre_quant = nn.Conv2d(args.z_channels, args.embed_dim, 1)
        self.codebook = nn.Embedding(args.vocab_size, args.embed_dim)
        self.codebook.weight.data.uniform_(-1.0 / args.vocab_size, 1.0 / args.vocab_size)
        self.post_quant = nn.Conv2d(args.embed_dim, args.z_channels, 1)
        self.decoder = Decoder(channels, args)
        self.side = args.resolution // 2 ** (len(args.ch_mult) - 1)
        self.tokens_per_frame = self.side**2
        self.bernoulli = args.reconstruction == "bernoulli"
        # tokenizer updates since each code was last picked (for --codebook-restart)
        self.register_buffer("idle", torch.zeros(args.vocab_size, dtype=torch.long))

    def quantize(self, z):
        """Nearest codebook vector per position: z (N, E, h, w) -> tokens (N, h·w), z_q (N, E, h, w).
        ‖z − e‖² = ‖z‖² + ‖e‖² − 2 z·e, argmin over the codebook (VQ-VAE, van den Oord et al. 2017)."""
        n, e, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, e).float()
        book = self.codebook.weight.float()
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.t()
        tokens = dist.argmin(1)
        z_q = self.codebook(tokens).view(n, h, w, e).permute(0, 3, 1, 2)
        return tokens.view(n, h * w), z_q

    def encode(self, frames):
        """frames (..., C, H, W) in [0, 1] -> z, z_q (N, E, h, w), tokens (..., K)."""
        lead = frames.shape[:-3]
        x = frames.reshape(-1, *frames.shape[-3:]).mul(2).sub(1)
        if torch.is_grad_enabled():  # NCHW: CPU GroupNorm backward on channels-last bf16 took 55% of the update
            z = self.pre_quant(self.encoder(x.contiguous()))
        else:  # speed (CPU): in chunks, channels-last: the same result, on a CPU 1.6× and 1.35× faster at the paper size
            z = torch.cat([self.pre_quant(self.encoder(c.contiguous(memory_format=torch.channels_last)))
                           for c in x.split(frames_per_pass(x))])
        tokens, z_q = self.quantize(z)
        return z, z_q, tokens.view(*lead, -1)

    def decode(self, z_q):
        """z_q (N, E, h, w) -> frames in [-1, 1] (N, C, H, W), or pixel logits if self.bernoulli."""
        if torch.is_grad_enabled():
            return self.decoder(self.post_quant(z_q.contiguous()))
        return torch.cat([self.decoder(self.post_quant(c.contiguous(memory_format=torch.channels_last)))
                          for c in z_q.split(frames_per_pass(z_q))])

    def decode_tokens(self, tokens):
        """tokens (..., K) -> frames in [0, 1] (..., C, H, W)."""
        lead = tokens.shape[:-1]
        z_q = self.codebook(tokens.reshape(-1, self.side, self.side)).permute(0, 3, 1, 2)
        out = self.decode(z_q).float()
        frames = out.sigmoid() if self.bernoulli else out.add(1).div(2).clamp(0, 1)
        return frames.reshape(*lead, *frames.shape[1:])

    @torch.no_grad()
    def encode_decode(self, frames):
        """The frames as the agent sees them: through the codebook and back, in [0, 1]."""
        return self.decode_tokens(self.encode(frames)[2])


def tokenizer_loss(tokenizer: Tokenizer, frames, lpips=None) -> tuple[torch.Tensor, dict]:
    """Official Tokenizer.compute_loss: L1 reconstruction in [-1, 1] + codebook + commitment (β = 1; the
    commitment term's β sits on the encoder side as in the VQ-VAE paper) [+ perceptual]. The decoder sees
    z + sg(z_q − z): the straight-through estimator copies the decoder's gradient to the encoder. With
    reconstruction 'bernoulli' the L1 term is the binary cross-entropy of the decoder's logits (deviation 5)."""
    x = frames.mul(2).sub(1)
    z, z_q, _ = tokenizer.encode(frames)
    z, z_q = z.float(), z_q.float()
    recon = tokenizer.decode(z + (z_q - z).detach()).float()
    codebook = (z.detach() - z_q).pow(2).mean()
    commitment = (z - z_q.detach()).pow(2).mean()
    if tokenizer.bernoulli:
        reconstruction = F.binary_cross_entropy_with_logits(recon, frames.float())
    else:
        reconstruction = (x - recon).abs().mean()
    loss = reconstruction + codebook + 1.0 * commitment
    metrics = dict(reconstruction_loss=reconstruction, codebook_loss=codebook, commitment_loss=commitment)
    if lpips is not None:
        perceptual = lpips(x, recon).mean()
        loss = loss + perceptual
        metrics["perceptual_loss"] = perceptual
    return loss, metrics


def tokenizer_update(tokenizer: Tokenizer, opt, frames, clip: float, autocast, lpips=None, check=lambda losses: None) -> dict:
    """One tokenizer step on `frames`. speed (CPU): forward/backward in micro-batches of CHUNK frames with the
    gradients of their size-weighted losses summed: the gradient of the whole batch's mean loss, in one Adam step
    (on a CPU 1.6× faster at batch 256 than one pass; the official code has the same option as grad_acc_steps). On
    CUDA the batch is one micro-batch. Metrics are device tensors."""
    opt.zero_grad(set_to_none=True)
    sums = {}
    for chunk in frames.split(frames_per_pass(frames)):
        with autocast:
            loss, metrics = tokenizer_loss(tokenizer, chunk, lpips)
        check({"tokenizer_loss": loss})
        (loss * len(chunk) / len(frames)).backward()
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() * len(chunk) / len(frames)
    sums["grad_norm"] = nn.utils.clip_grad_norm_(tokenizer.parameters(), clip)
    opt.step()
    return sums


@torch.no_grad()
def restart_dead_codes(tokenizer: Tokenizer, frames) -> int:
    """Random restarts of dead codes (as in Jukebox, Dhariwal et al. 2020; not in IRIS; deviation 6). Codes
    not picked in the last DEAD_AFTER updates are moved onto distinct encoder outputs of this batch whose squared
    distance to their code exceeds MISFIT × the outputs' mean squared norm: rare patch contents that share a code
    with a common one get codes of their own, while codes in use (however rarely) and contents already fitted are
    left alone. Returns the number of codes moved."""
    z, z_q, tokens = tokenizer.encode(frames)
    tokenizer.idle.add_(1).index_fill_(0, tokens.flatten().unique(), 0)
    dead = (tokenizer.idle >= DEAD_AFTER).nonzero().flatten()
    flat, flat_q = (v.permute(0, 2, 3, 1).reshape(-1, v.shape[1]).float() for v in (z, z_q))
    error = (flat - flat_q).pow(2).sum(1)
    misfit = flat[error > MISFIT * flat.pow(2).sum(1).mean()].unique(dim=0)  # equal patches give equal outputs
    n = min(len(dead), len(misfit))
    if n:
        fitted = tokenizer.quantize(misfit[:, :, None, None])[1].flatten(1).float()
        order = (misfit - fitted).pow(2).sum(1).argsort(descending=True)[:n]  # the worst fitted first
        tokenizer.codebook.weight[dead[:n]] = misfit[order].to(tokenizer.codebook.weight.dtype)
        tokenizer.idle[dead[:n]] = 0
    return n


class LPIPS(nn.Module):
    """Perceptual distance (Zhang et al. 2018) with VGG16 features, in taming-transformers' parameter layout,
    so that its published weights load by name. Inputs in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = nn.Module()  # taming's names: scaling_layer.shift / scaling_layer.scale
        self.scaling_layer.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        vgg, c = [], 3
        for v in cfg:  # torchvision's vgg16.features indices 0-29
            if v == "M":
                vgg.append(nn.MaxPool2d(2, 2))
            else:
                vgg += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.net = nn.Module()
        for i, (a, b) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]):  # relu1_2 … relu5_3
            # torchvision's global layer indices stay the submodule names, as in taming's vgg16 slices
            setattr(self.net, f"slice{i + 1}", nn.Sequential(OrderedDict((str(j), vgg[j]) for j in range(a, b))))
        for i, c in enumerate([64, 128, 256, 512, 512]):
            setattr(self, f"lin{i}", nn.Module())
            getattr(self, f"lin{i}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x, y):
        shift, scale = self.scaling_layer.shift, self.scaling_layer.scale
        x, y = (x - shift) / scale, (y - shift) / scale
        total = 0.0
        for i in range(5):
            x, y = getattr(self.net, f"slice{i + 1}")(x), getattr(self.net, f"slice{i + 1}")(y)
            nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((nx - ny).pow(2)).mean((2, 3), keepdim=True)
        return total


def load_lpips(path: str, device) -> LPIPS:
    lpips = LPIPS()
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = lpips.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"--perceptual-weights '{path}' does not match the LPIPS layout: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")
    return lpips.to(device)


# World model: a GPT over blocks of K observation tokens + 1 action token (official world_model.py)
def causal_attention(q, k, v, drop: float):
    """softmax(q kᵀ/√d + causal mask) v, with dropout `drop` on the probabilities (q, k, v: (B, heads, N, d))."""
    if drop > 0 and q.device.type == "cpu":
        # speed (CPU): written out; PyTorch's CPU attention with dropout is unfused and upcasts to fp32 (most of an
        # update). The plain form is the line below, which CUDA runs fused.
        att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        return F.dropout(att.masked_fill(~causal, float("-inf")).softmax(-1), drop) @ v
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)


class SelfAttention(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.heads = args.heads
        self.qkv = nn.Linear(args.embed, 3 * args.embed)
        self.proj = nn.Linear(args.embed, args.embed)
        self.attn_drop, self.resid_drop = args.attn_dropout, nn.Dropout(args.dropout)

    def forward(self, x, cache: dict | None, layer: int):
        b, n, e = x.shape
        q, k, v = (t.view(b, n, self.heads, e // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        drop = self.attn_drop if self.training else 0.0
        if cache is None:  # a whole sequence: causal mask, in training dropout on the probabilities
            out = causal_attention(q, k, v, drop)
        else:  # n new tokens after cache["size"] cached ones: write their keys/values, attend to all so far
            past = cache["size"]
            if layer not in cache["k"]:
                shape = (b, self.heads, cache["max_tokens"], e // self.heads)
                cache["k"][layer], cache["v"][layer] = k.new_zeros(shape), v.new_zeros(shape)
            cache["k"][layer][:, :, past:past + n] = k
            cache["v"][layer][:, :, past:past + n] = v
            k, v = cache["k"][layer][:, :, :past + n], cache["v"][layer][:, :, :past + n]
            mask = None
            if n > 1:  # new token i (position past + i) sees keys j ≤ past + i
                mask = torch.arange(past + n, device=x.device)[None] <= past + torch.arange(n, device=x.device)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.resid_drop(self.proj(out.transpose(1, 2).reshape(b, n, e)))


class Block(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(args.embed), SelfAttention(args), nn.LayerNorm(args.embed)
        self.mlp = nn.Sequential(nn.Linear(args.embed, 4 * args.embed), nn.GELU(), nn.Linear(4 * args.embed, args.embed),
                                 nn.Dropout(args.dropout))

    def forward(self, x, cache, layer):
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


def head(embed: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(embed, embed), nn.ReLU(), nn.Linear(embed, out))


class WorldModel(nn.Module):
    """Token sequence -> logits of the next observation token, the reward's sign (3 classes) and termination.

    Position p holds an action token when p mod (K+1) = K. The observation head reads every position but the
    last observation token of a block (whose successor is the action token); the reward and termination
    heads read the action tokens."""

    def __init__(self, tokens_per_frame: int, num_actions: int, args: Args):
        super().__init__()
        self.k, self.block = tokens_per_frame, tokens_per_frame + 1
        self.max_tokens = args.max_blocks * self.block
        self.obs_emb = nn.Embedding(args.vocab_size, args.embed)
        self.act_emb = nn.Embedding(num_actions, args.embed)
        self.pos_emb = nn.Embedding(self.max_tokens, args.embed)
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.layers))
        self.ln_f = nn.LayerNorm(args.embed)
        self.head_obs, self.head_reward, self.head_end = head(args.embed, args.vocab_size), head(args.embed, 3), head(args.embed, 2)
        self.layers = args.layers
        self.apply(self._init)

    @staticmethod
    def _init(m):  # official init_weights: N(0, 0.02) for linear and embedding weights, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.zero_()

    def new_cache(self) -> dict:
        return dict(k={}, v={}, size=0, max_tokens=self.max_tokens)

    def forward(self, tokens, cache: dict | None = None):
        """tokens (B, n) following `cache["size"]` cached ones (or starting a sequence) -> (obs logits at the
        obs-head positions, reward logits and end logits at the action positions), in sequence order."""
        past = 0 if cache is None else cache["size"]
        n = tokens.shape[1]
        if past + n > self.max_tokens:
            raise ValueError(f"{past + n} tokens exceed the context of {self.max_tokens}.")
        pos = torch.arange(past, past + n, device=tokens.device)
        is_act = pos % self.block == self.k
        x = torch.empty(*tokens.shape, self.pos_emb.embedding_dim, device=tokens.device)
        x[:, is_act] = self.act_emb(tokens[:, is_act])
        x[:, ~is_act] = self.obs_emb(tokens[:, ~is_act])
        x = self.drop(x + self.pos_emb(pos))
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache, i)
        x = self.ln_f(x)
        if cache is not None:
            cache["size"] = past + n
        obs_pos = pos % self.block != self.k - 1
        return self.head_obs(x[:, obs_pos]), self.head_reward(x[:, is_act]), self.head_end(x[:, is_act])


def world_model_labels(obs_tokens, rewards, ends, mask):
    """Official compute_labels_world_model. obs_tokens (B, L, K), rewards/ends/mask (B, L): the next token of
    the flattened sequence for every obs-head position, sign(r_t) + 1, d_t; -100 (ignored) where padded."""
    pad = ~mask
    labels_obs = obs_tokens.masked_fill(pad[..., None], -100).flatten(1)[:, 1:]
    labels_reward = (torch.sign(rewards) + 1).long().masked_fill(pad, -100)
    labels_end = ends.long().masked_fill(pad, -100)
    return labels_obs, labels_reward, labels_end


def world_model_loss(tokenizer: Tokenizer, wm: WorldModel, batch: dict) -> tuple[torch.Tensor, dict]:
    """Cross-entropies of the next observation token, the reward's sign and termination (paper §2.2)."""
    with torch.no_grad():
        obs_tokens = tokenizer.encode(batch["frames"])[2]  # (B, L, K)
    tokens = torch.cat([obs_tokens, batch["action"][..., None]], 2).flatten(1)  # (B, L·(K+1))
    logits_obs, logits_reward, logits_end = wm(tokens)
    labels_obs, labels_reward, labels_end = world_model_labels(obs_tokens, batch["reward"], batch["end"], batch["mask"])
    logits_obs = logits_obs[:, :-1].float()  # the last action token's prediction has no label in the window
    loss_obs = F.cross_entropy(logits_obs.flatten(0, 1), labels_obs.flatten(), ignore_index=-100)
    loss_reward = F.cross_entropy(logits_reward.float().flatten(0, 1), labels_reward.flatten(), ignore_index=-100)
    loss_end = F.cross_entropy(logits_end.float().flatten(0, 1), labels_end.flatten(), ignore_index=-100)
    valid = labels_obs != -100
    accuracy = (logits_obs.argmax(-1) == labels_obs)[valid].float().mean()
    return loss_obs + loss_reward + loss_end, dict(obs_loss=loss_obs, reward_loss=loss_reward, end_loss=loss_end,
                                                    token_accuracy=accuracy)


class DreamEnv:
    """The world model as an environment (official WorldModelEnv): start from real frames, then each step feeds
    the action token, samples reward and termination from its output, and samples the K tokens of the next
    frame one at a time. With `use_cache` every pass feeds one token through the KV cache; without, every
    pass recomputes the whole sequence (same predictions, for the benchmark of what the cache saves)."""

    def __init__(self, tokenizer: Tokenizer, wm: WorldModel, use_cache: bool = True):
        self.tokenizer, self.wm, self.use_cache = tokenizer, wm, use_cache

    @torch.no_grad()
    def reset(self, frames):
        """frames (B, C, H, W) in [0, 1] -> the frames as decoded from their tokens."""
        self.tokens = self.tokenizer.encode(frames)[2]
        self._restart()
        return self.tokenizer.decode_tokens(self.tokens)

    def _restart(self):
        """Context = the current frame's tokens only (at reset, and when the context is full)."""
        self.seq, self.cache = self.tokens, self.wm.new_cache()
        if self.use_cache:
            self.wm(self.tokens, self.cache)

    def _feed(self, token):
        self.seq = torch.cat([self.seq, token], 1)
        if self.use_cache:
            return self.wm(token, self.cache)
        return self.wm(self.seq)

    @torch.no_grad()
    def step(self, action, predict_next: bool = True):
        """action (B,) -> (next frames or None, reward in {-1, 0, 1}, end as bool)."""
        k = self.wm.k
        passes = 1 + k if predict_next else 1
        if self.seq.shape[1] + passes > self.wm.max_tokens:
            self._restart()
        token, new = action[:, None], []
        for i in range(passes):  # feed a_t, then o_{t+1}^1 … o_{t+1}^K
            logits_obs, logits_reward, logits_end = self._feed(token)
            if i == 0:  # the outputs at a_t: r_t, d_t and o_{t+1}^1
                reward = torch.distributions.Categorical(logits=logits_reward[:, -1].float()).sample().float() - 1
                end = torch.distributions.Categorical(logits=logits_end[:, -1].float()).sample().bool()
            if i < k:
                token = torch.distributions.Categorical(logits=logits_obs[:, -1].float()).sample()[:, None]
                new.append(token)
        if not predict_next:
            return None, reward, end
        self.tokens = torch.cat(new, 1)
        return self.tokenizer.decode_tokens(self.tokens), reward, end


# Actor-critic (official actor_critic.py): CNN + LSTM on frames decoded by the tokenizer
class ActorCritic(nn.Module):
    def __init__(self, channels: int, resolution: int, num_actions: int, lstm: int = 512):
        super().__init__()
        n = math.ceil(math.log2(resolution / 4))  # conv+pool layers down to at most 4×4 (4 at 64×64, the official net)
        widths = [32] * (n - n // 2) + [64] * (n // 2)
        layers, c, side = [], channels, resolution
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.MaxPool2d(2, 2), nn.ReLU()]
            c, side = w, side // 2
        self.cnn = nn.Sequential(*layers, nn.Flatten())
        self.lstm = nn.LSTMCell(c * side * side, lstm)
        self.actor, self.critic = nn.Linear(lstm, num_actions), nn.Linear(lstm, 1)
        self.hidden = lstm

    def initial(self, batch: int, device):
        return torch.zeros(batch, self.hidden, device=device), torch.zeros(batch, self.hidden, device=device)

    def forward(self, frames, state, mask=None):
        """frames (B, C, H, W) in [0, 1]; rows where mask is False keep their state (padding in a burn-in)."""
        x = self.cnn(frames.mul(2).sub(1))
        h, c = self.lstm(x.float(), state)
        if mask is not None:
            h, c = torch.where(mask[:, None], h, state[0]), torch.where(mask[:, None], c, state[1])
        return self.actor(h), self.critic(h)[:, 0], (h, c)


def lambda_returns(rewards, values, ends, gamma: float, lambda_: float):
    """Official compute_lambda_returns (paper Eq. 3–4): G_{H-1} = V_{H-1},
    G_t = r_t + γ (1 − d_t) [(1 − λ) V_{t+1} + λ G_{t+1}], where r_t and d_t come from taking a_t in s_t."""
    returns = torch.empty_like(values)
    returns[:, -1] = values[:, -1]
    for t in reversed(range(values.shape[1] - 1)):
        returns[:, t] = rewards[:, t] + gamma * (~ends[:, t]).float() * (
            (1 - lambda_) * values[:, t + 1] + lambda_ * returns[:, t + 1])
    return returns


def imagine(tokenizer: Tokenizer, wm: WorldModel, ac: ActorCritic, batch: dict, horizon: int):
    """Burn the LSTM in on the first frames of each sequence (reconstructed, without gradient, skipping
    padding), then act for `horizon` steps in the world model from the last real frame (official imagine)."""
    frames, mask = batch["frames"], batch["mask"]
    b = frames.shape[0]
    state = ac.initial(b, frames.device)
    with torch.no_grad():
        if frames.shape[1] > 1:
            burn = tokenizer.encode_decode(frames[:, :-1])
            for t in range(burn.shape[1]):
                _, _, state = ac(burn[:, t], state, mask[:, t])
    env = DreamEnv(tokenizer, wm)
    obs = env.reset(frames[:, -1])
    out = {k: [] for k in ("frames", "action", "logits", "value", "reward", "end")}
    for t in range(horizon):
        logits, value, state = ac(obs, state)
        action = torch.distributions.Categorical(logits=logits.float()).sample()
        out["frames"].append(obs)
        obs, reward, end = env.step(action, predict_next=t < horizon - 1)
        for k, v in dict(action=action, logits=logits, value=value, reward=reward, end=end).items():
            out[k].append(v)
    return {k: torch.stack(v, 1) for k, v in out.items()}


def actor_critic_loss(traj: dict, gamma: float, lambda_: float, entropy_weight: float) -> tuple[torch.Tensor, dict]:
    """REINFORCE with the value as baseline against λ-returns, value regression, entropy bonus (paper §2.3).
    The last step only bootstraps: losses use steps 0..H-2 as officially."""
    values = traj["value"].float()
    with torch.no_grad():
        returns = lambda_returns(traj["reward"], values, traj["end"], gamma, lambda_)[:, :-1]
    values = values[:, :-1]
    dist = torch.distributions.Categorical(logits=traj["logits"][:, :-1].float())
    log_prob = dist.log_prob(traj["action"][:, :-1])
    loss_actions = -(log_prob * (returns - values.detach())).mean()
    loss_entropy = -entropy_weight * dist.entropy().mean()
    loss_values = F.mse_loss(values, returns)
    return loss_actions + loss_entropy + loss_values, dict(
        actor_loss=loss_actions, entropy=dist.entropy().mean(), value_loss=loss_values, imagined_return=returns[:, 0].mean(),
        imagined_reward=traj["reward"].mean())


# Replay segments (official EpisodesDataset.sample_batch), on top of common/replay.py
def episode_spans(replay: Replay) -> np.ndarray:
    """(start row, blocks) of each held episode, rows counted from the oldest held. An episode of n rows has
    n − 1 blocks (obs row s+t with the action, reward and termination of row s+t+1): its last observation is
    never a block's frame, as the official episodes never store it."""
    oldest = (replay.next - replay.size) % replay.capacity
    first = replay.data["is_first"][(oldest + np.arange(replay.size)) % replay.capacity].copy()
    first[0] = True  # an episode whose start was evicted still counts from its oldest held row
    starts = np.flatnonzero(first)
    blocks = np.diff(np.append(starts, replay.size)) - 1
    return np.stack([starts[blocks > 0], blocks[blocks > 0]], 1)


def sample_segments(replay: Replay, spans: np.ndarray, batch: int, length: int, from_start: bool) -> dict:
    """`batch` segments of `length` blocks from uniformly drawn episodes. from_start: the segment starts at a
    uniform block and is padded after the episode's end; else it ends at a uniform block and is padded before
    the start. Returns numpy arrays (B, L, ...) with mask False on padding."""
    rng = replay.rng
    ep = rng.integers(0, len(spans), size=batch)
    start, n = spans[ep, 0], spans[ep, 1]
    if from_start:
        first = rng.integers(0, n)
    else:
        first = rng.integers(1, n + 1) - length
    t = first[:, None] + np.arange(length)[None]
    mask = (t >= 0) & (t < n[:, None])
    t = np.clip(t, 0, n[:, None] - 1)
    oldest = (replay.next - replay.size) % replay.capacity
    obs_idx = (oldest + start[:, None] + t) % replay.capacity
    nxt_idx = (obs_idx + 1) % replay.capacity
    d = replay.data
    return dict(obs=d["obs"][obs_idx], action=d["action"][nxt_idx], reward=d["reward"][nxt_idx],
                end=d["terminated"][nxt_idx], mask=mask)


def to_frames(obs, resolution: int):
    """uint8 (..., C, H, W) -> float in [0, 1], zero-padded at the bottom/right to resolution × resolution."""
    x = obs.float() / 255.0
    h, w = x.shape[-2:]
    if (h, w) != (resolution, resolution):
        x = F.pad(x, (0, resolution - w, 0, resolution - h))
    return x


def to_batch(data: dict, resolution: int, device) -> dict:
    batch = to_device(data, device)
    batch["frames"] = to_frames(batch.pop("obs"), resolution)
    batch["action"] = batch["action"].long()
    return batch


@torch.no_grad()
def openloop_video(tokenizer: Tokenizer, wm: WorldModel, batch: dict, frame_hw: tuple):
    """Real frames (top), the tokenizer's reconstructions (middle) and the world model's imagination from the
    first real frame driven by the real actions (bottom), n sequences side by side; uint8 (T, 3, 3H, n·W)."""
    n = min(6, batch["frames"].shape[0])
    frames, action = batch["frames"][:n], batch["action"][:n]
    env, dream = DreamEnv(tokenizer, wm), []
    dream.append(env.reset(frames[:, 0]))
    for t in range(frames.shape[1] - 1):
        dream.append(env.step(action[:, t])[0])
    rows = [frames, tokenizer.encode_decode(frames), torch.stack(dream, 1)]
    h, w = frame_hw
    rows = [r[..., :h, :w].float() for r in rows]
    if h < 32:  # MinAtar: enlarge 6× for viewing
        rows = [r.repeat_interleave(6, -1).repeat_interleave(6, -2) for r in rows]
    video = torch.cat(rows, 3)  # (n, T, C, 3H, W)
    video = torch.cat(list(video), -1)
    if video.shape[1] != 3:
        video = video.max(1, keepdim=True).values.expand(-1, 3, -1, -1)  # MinAtar's object channels
    return (video.clamp(0, 1) * 255).to(torch.uint8).cpu()


# Acting in the real environment
class Agent:
    """The actor-critic on tokenizer reconstructions (official Agent.act), with its LSTM state."""

    def __init__(self, tokenizer: Tokenizer, ac: ActorCritic, resolution: int, device):
        self.tokenizer, self.ac, self.resolution, self.device = tokenizer, ac, resolution, device
        self.state = None

    def frames(self, obs):
        return self.tokenizer.encode_decode(to_frames(torch.as_tensor(np.asarray(obs), device=self.device), self.resolution))

    @torch.no_grad()
    def burn_in(self, recent):
        """Rebuild the LSTM state from the episode's last frames (official collector, after each training phase)."""
        self.state = self.ac.initial(1, self.device)
        if recent:
            for frame in self.frames(np.stack(recent)):
                _, _, self.state = self.ac(frame[None], self.state)

    @torch.no_grad()
    def act(self, obs, temperature: float) -> int:
        if self.state is None:
            self.state = self.ac.initial(1, self.device)
        logits, _, self.state = self.ac(self.frames(obs[None]), self.state)
        return int(torch.distributions.Categorical(logits=logits[0].float() / temperature).sample())


def evaluate(agent: Agent, args: Args, episodes: int) -> list[float]:
    """Episodes in a fresh env without life loss, the policy sampled at the evaluation temperature."""
    env = make_env(args.env_id, args.seed + 10_000, action_repeat=args.action_repeat, pixels=True)
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=args.seed + 10_000 + ep)
        agent.state, done, total = None, False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent.act(obs, args.eval_temperature))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def optimizer_step(opt, loss, module, clip: float):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm_ = nn.utils.clip_grad_norm_(module.parameters(), clip)
    opt.step()
    return norm_


def world_model_optimizer(wm: WorldModel, args: Args):
    """Official configure_optimizer: AdamW, weight decay on linear weights only (not biases, norms, embeddings)."""
    decay = [m.weight for m in wm.modules() if isinstance(m, nn.Linear)]
    ids = {id(p) for p in decay}
    rest = [p for p in wm.parameters() if id(p) not in ids]
    return torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay), dict(params=rest, weight_decay=0.0)],
                             lr=args.learning_rate)


# Training loop (Algorithm 1 of the paper: collect, then train tokenizer, world model, actor-critic, per epoch)
def main(args: Args):
    check_args(args)
    family = env_family(args.env_id)
    try:  # a bad env id or space stops here, before a run directory is made
        env = make_env(args.env_id, args.seed, pixels=True, action_repeat=args.action_repeat,
                       life_loss=args.life_loss and family == "atari", size=args.resolution)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise SystemExit(f"IRIS tokenizes actions and needs a Discrete action space; '{args.env_id}' has {env.action_space}.")
    if not is_image_space(env.observation_space):
        raise SystemExit(f"IRIS needs image observations; '{args.env_id}' gives {env.observation_space.shape}.")
    if args.encoder not in ("taming", "patch"):
        raise SystemExit(f"--encoder must be taming or patch, not '{args.encoder}'.")
    if args.reconstruction not in ("l1", "bernoulli"):
        raise SystemExit(f"--reconstruction must be l1 or bernoulli, not '{args.reconstruction}'.")
    if args.reconstruction == "bernoulli" and args.perceptual_weights:
        raise SystemExit("--perceptual-weights needs --reconstruction l1 (LPIPS compares RGB images, not pixel logits).")
    channels, height, width = env.observation_space.shape
    if height > args.resolution or width > args.resolution or args.resolution % 2 ** (len(args.ch_mult) - 1):
        raise SystemExit(f"--resolution {args.resolution} must hold {height}×{width} frames and be divisible by "
                         f"2^{len(args.ch_mult) - 1} (one halving per --ch-mult level after the first).")
    num_actions = env.action_space.n
    run_dir, resumed = open_run(args)
    if args.capture_video:
        env.close()
        env = make_env(args.env_id, args.seed, pixels=True, action_repeat=args.action_repeat, size=args.resolution,
                       life_loss=args.life_loss and family == "atari", capture_video=True,
                       video_dir=os.path.join(run_dir, "videos"))
    seed_everything(args.seed, args.torch_deterministic)
    device = choose_device(args.cuda)

    tokenizer = Tokenizer(channels, args).to(device)
    wm = WorldModel(tokenizer.tokens_per_frame, num_actions, args).to(device)
    ac = ActorCritic(channels, args.resolution, num_actions).to(device)
    lpips = None
    if args.perceptual_weights:
        lpips = load_lpips(args.perceptual_weights, device)
    else:
        print("tokenizer: no perceptual loss (no LPIPS weights given; see deviation 1)")
    opts = dict(tokenizer=torch.optim.Adam(tokenizer.parameters(), args.tokenizer_learning_rate or args.learning_rate),
                world_model=world_model_optimizer(wm, args),
                actor_critic=torch.optim.Adam(ac.parameters(), args.actor_critic_learning_rate or args.learning_rate))
    # every step is kept (Atari 100k): steps plus one reset row per episode; untouched rows cost no memory
    replay = Replay(2 * (args.total_timesteps // args.action_repeat) + 1000, os.path.join(run_dir, "episodes"), seed=args.seed)

    global_step, epoch, updates, trained, last_return = 0, 1, 0, dict(tokenizer=0, world_model=0, actor_critic=0), None
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resumed:
        ckpt = load_checkpoint(ckpt_path, device, tokenizer=tokenizer, wm=wm, ac=ac,
                               **{f"{k}_opt": o for k, o in opts.items()})
        global_step, epoch, updates, trained = ckpt["global_step"], ckpt["epoch"], ckpt["updates"], ckpt["trained"]
        last_return = ckpt.get("last_return")
        rows = replay.load()
        replay.rng.bit_generator.state = ckpt["replay_rng"]
        print(f"resumed {run_dir} at step {global_step}, epoch {epoch}; {rows} replay rows reloaded")
    writer = make_writer(run_dir, args, resumed)
    print(f"run: {run_dir}  preset: {args.preset}  obs {env.observation_space.shape} -> {args.resolution}×{args.resolution}, "
          f"{tokenizer.tokens_per_frame} tokens/frame, {num_actions} actions")

    def save():
        replay.save_partial()
        if args.save_model:
            save_checkpoint(ckpt_path, dict(
                tokenizer=tokenizer.state_dict(), wm=wm.state_dict(), ac=ac.state_dict(),
                **{f"{k}_opt": o.state_dict() for k, o in opts.items()}, global_step=global_step, epoch=epoch,
                updates=updates, trained=dict(trained), last_return=last_return,
                replay_rng=replay.rng.bit_generator.state, args=vars(args)))
        return ckpt_path

    stop = []  # SIGTERM / Ctrl-C set this; the run stops between env steps or updates, never inside one
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    agent = Agent(tokenizer, ac, args.resolution, device)
    frames_per_epoch = args.steps_per_epoch * args.action_repeat
    collect_epochs = math.ceil(args.total_timesteps / frames_per_epoch)
    total_epochs = collect_epochs + args.final_epochs
    per_epoch = dict(tokenizer=args.tokenizer_updates, world_model=args.world_model_updates,
                     actor_critic=args.actor_critic_updates)
    starts = dict(tokenizer=args.tokenizer_start, world_model=args.world_model_start, actor_critic=args.actor_critic_start)
    progress = Progress(args.total_timesteps, global_step)
    next_log = (global_step // args.log_every + 1) * args.log_every
    recent = deque(maxlen=args.burn_in)  # the current episode's frames before the current one

    def tokenizer_frames():
        """A tokenizer batch: single frames from uniformly drawn episodes."""
        data = sample_segments(replay, episode_spans(replay), args.tokenizer_batch, 1, from_start=True)
        return to_batch(data, args.resolution, device)["frames"][:, 0]

    def update(component: str) -> dict:
        """One gradient step of one component on a fresh batch (official Trainer.train_component)."""
        if component == "tokenizer":
            frames = tokenizer_frames()
            metrics = tokenizer_update(tokenizer, opts["tokenizer"], frames, args.grad_clip, autocast, lpips,
                                       lambda losses: check_finite(losses, updates, save))
            if args.codebook_restart:
                metrics["codes_restarted"] = restart_dead_codes(tokenizer, frames)
            return metrics
        spans = episode_spans(replay)
        if component == "world_model":
            batch = to_batch(sample_segments(replay, spans, args.world_model_batch, args.max_blocks, True), args.resolution, device)
            with autocast:
                loss, metrics = world_model_loss(tokenizer, wm, batch)
            module = wm
        else:
            data = sample_segments(replay, spans, args.actor_critic_batch, args.burn_in + 1, from_start=False)
            batch = to_batch(data, args.resolution, device)
            with autocast:
                traj = imagine(tokenizer, wm, ac, batch, args.horizon)
                loss, metrics = actor_critic_loss(traj, args.gamma, args.lambda_, args.entropy_weight)
            module = ac
        check_finite({f"{component}_loss": loss}, updates, save)
        metrics["grad_norm"] = optimizer_step(opts[component], loss, module, args.grad_clip)
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in metrics.items()}  # device tensors, read when logged

    obs, _ = env.reset(seed=args.seed + global_step)
    try:
        replay.add(obs=obs, action=np.int64(0), reward=0.0, terminated=False, truncated=False, is_first=True)
        while epoch <= total_epochs:
            phase = "collect" + "".join(f"+{c}" for c in starts if epoch > starts[c])  # what this epoch trains
            if phase != progress.phase:
                progress.start_phase(phase, global_step)
            # 1. collect (official collector: ε-greedy on the sampled policy, its LSTM re-burnt-in each epoch)
            tokenizer.eval(), wm.eval(), ac.eval()
            agent.burn_in(list(recent))
            epoch_end = min(epoch * frames_per_epoch, args.total_timesteps)
            while global_step < epoch_end:
                if stop:
                    raise KeyboardInterrupt
                action = agent.act(obs, args.temperature)
                if np.random.random() < args.epsilon:
                    action = int(env.action_space.sample())
                recent.append(obs)
                obs, reward, terminated, truncated, info = env.step(action)
                global_step += args.action_repeat
                replay.add(obs=obs, action=np.int64(action), reward=reward, terminated=terminated, truncated=truncated,
                           is_first=False)
                if "episode" in info:
                    last_return = float(info["episode"]["r"])
                    writer.add_scalar("charts/episodic_return", last_return, global_step)
                    writer.add_scalar("charts/episodic_length", int(info["episode"]["l"]) * args.action_repeat, global_step)
                if terminated or truncated:
                    obs, _ = env.reset()
                    replay.add(obs=obs, action=np.int64(0), reward=0.0, terminated=False, truncated=False, is_first=True)
                    agent.state = None
                    recent.clear()
                if global_step >= next_log:
                    next_log += args.log_every
                    writer.add_scalar("charts/SPS", progress.sps(global_step), global_step)
                    print(progress.line(global_step, last_return), f"epoch {epoch}/{total_epochs}", flush=True)

            # 2. train each component whose start epoch has passed, tokenizer -> world model -> actor-critic
            for component, module in (("tokenizer", tokenizer), ("world_model", wm), ("actor_critic", ac)):
                if epoch <= starts[component] or len(episode_spans(replay)) == 0:
                    continue
                module.train()
                sums, t0, n0 = {}, time.perf_counter(), trained[component]
                if component == "tokenizer":  # token churn: fixed frames, encoded before and after this epoch's updates
                    probe = tokenizer_frames()
                    with torch.no_grad():
                        before = tokenizer.encode(probe)[2]
                while trained[component] < per_epoch[component]:
                    if stop:
                        raise KeyboardInterrupt
                    for k, v in update(component).items():
                        sums[k] = sums.get(k, 0.0) + v
                    trained[component] += 1
                    updates += 1
                module.eval()
                done = trained[component] - n0
                if done:
                    tag = "tokenizer" if component == "tokenizer" else "world_model" if component == "world_model" else "losses"
                    for k, v in sums.items():
                        writer.add_scalar(f"{tag}/{k}", float(v) / done, global_step)
                    writer.add_scalar(f"perf/{component}_update_ms", 1000 * (time.perf_counter() - t0) / done, global_step)
                if done and component == "tokenizer":  # the world model learns on these tokens: a changed one is a new word
                    with torch.no_grad():
                        changed = (tokenizer.encode(probe)[2] != before).float().mean()
                    writer.add_scalar("tokenizer/tokens_changed", float(changed), global_step)
            if args.video_every and epoch > starts["world_model"] and epoch % args.video_every == 0:
                data = sample_segments(replay, episode_spans(replay), 6, min(args.max_blocks, args.horizon), True)
                with autocast:
                    add_video(writer, "media/openloop", openloop_video(tokenizer, wm, to_batch(data, args.resolution, device),
                                                                       (height, width)), global_step)
            epoch += 1
            trained = dict(tokenizer=0, world_model=0, actor_critic=0)
            if args.save_model and (epoch - 1) % args.checkpoint_every == 0:
                save()
            print(f"epoch {epoch - 1}/{total_epochs} done: step {global_step}, updates {updates}, "
                  f"return {'-' if last_return is None else f'{last_return:.1f}'}", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted at step {global_step} (epoch {epoch}); saving checkpoint and the unfinished episode")
        save()
        writer.close()
        env.close()
        sys.exit(130)
    except BaseException:
        replay.save_partial()  # a crash keeps every collected step on disk
        raise
    save()
    if args.eval_episodes > 0:
        tokenizer.eval(), wm.eval(), ac.eval()
        returns = evaluate(agent, args, args.eval_episodes)
        for r in returns:
            writer.add_scalar("eval/episodic_return", r, global_step)
        print(f"eval: mean return {np.mean(returns):.1f} over {len(returns)} episodes (temperature {args.eval_temperature})")
    writer.close()
    env.close()


if __name__ == "__main__":
    main(parse_args(Args, PRESETS, default_preset))
