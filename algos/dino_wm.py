"""DINO-WM: "World Models on Pre-trained Visual Features enable Zero-shot Planning", Zhou, Pan, LeCun, Pinto (2024),
arXiv 2411.04983.

A frozen DINOv2 ViT-S/14 turns each frame into 14×14 patch features. A ViT predictor, attending causally over
frames, learns from an offline dataset to predict the next frame's patch features from a history of three,
each patch carrying an embedding of the proprioception and of the (frameskip-grouped) action. At test time a
goal image is reached by model-predictive control: CEM searches action sequences whose predicted final
features are closest to the goal image's features. No reward and no reconstruction are involved.

Run:  python algos/dino_wm.py --env-id PointMaze_UMaze-v3 --encoder-weights dinov2_vits14.pth   (paper preset, GPU)
      python algos/dino_wm.py --env-id Wall-v0 --preset small                              (small preset, CPU)
      python algos/dino_wm.py --resume runs/<run_name> --env-id ...                        (continue a stopped run)
Phases, each resumable: 1. generate the offline dataset (random smooth actions) into runs/<run>/episodes;
2. train the predictor (and the optional visualisation decoder); 3. evaluate `eval_episodes` goal-reaching
episodes by MPC with CEM and report the success rate. The preset is chosen with --preset (default: paper, whatever
the hardware; small for a CPU); every flag given explicitly wins over the preset.

Alignment (frameskip f = 5; replay rows follow common/replay.py, action[t] produced obs[t]):

    model frame k   :  obs row f·k            proprio row f·k
    model action k  :  concat(action rows f·k+1 … f·k+f)    the f actions taken after frame k, towards frame k+1
    predictor input :  frames k-2, k-1, k (each patch ⊕ proprio_k ⊕ action_k)  ->  output at frame k = frame k+1

Deviations from the paper / official code (gaoyuezhou/dino_wm):
 1. Without `--encoder-weights` the encoder is randomly initialised (nothing can be downloaded here); the log
    says so. The weights load from a state dict in the official DINOv2 key layout (`patch_embed.proj.weight`,
    `blocks.0.attn.qkv.weight`, `blocks.0.ls1.gamma`, …); the 37×37 pretraining position embeddings are
    resized bicubically to the frame's patch grid.
 2. Offline data come from a smooth random policy (a_t = clip(a_{t-1} + 0.3·ε)), generated here, instead of
    the paper's released datasets (PushT's are expert demonstrations). Goals are the state reached by
    `goal_h`·frameskip random actions from the start, as in the paper's evaluation.
 3. CEM samples are clipped to the action bounds ([-1, 1] before normalisation); actions and proprioception
    are normalised by the dataset's mean and standard deviation as officially.
 4. The optional decoder (visualisation only) is a per-patch MLP onto pixels, not the official VQ-VAE decoder.
 5. The `small` preset (CPU) is ours: 56×56 frames (4×4 patches), a 3-block predictor (4 heads of 32, MLP
    512), encoder features computed once for the whole dataset (the encoder is frozen, so this equals the
    per-batch encoding), CEM with 100 samples, 10 elites and 5 iterations, at most 3 replans, 20 episodes.
 6. `total_timesteps` counts the environment steps of the generated dataset (episodes × episode_length).
 7. Choices where the official configs differ between files: the proprio weight α of the planning cost is 0.1
    (the training config's planning evaluations use 0.1 and 1; one planning config uses 0); every trained
    part uses AdamW with PyTorch's default weight decay; proprio and action embeddings have 10 dims each.
"""

# Imports
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.goal_envs import GOAL_ENV_IDS, make_goal_env  # noqa: E402
from common.replay import load_episode, save_episode  # noqa: E402
from common.run import (  # noqa: E402
    add_video, check_finite, choose_device, load_checkpoint, make_writer, open_run, parse_args, require,
    save_checkpoint, seed_everything, to_device,
)


# Hyperparameters (defaults: the paper's, official conf/train.yaml, conf/planner/mpc_cem.yaml)
@dataclass
class Args:
    exp_name: str = "dino_wm"
    """name of this experiment (the file name)"""
    env_id: str = "PointMaze_UMaze-v3"
    """PointMaze_UMaze-v3 (gymnasium-robotics), PushT-v0 (gym-pusht) or Wall-v0 (common/goal_envs.py)"""
    preset: str = "paper"
    """paper | small; explicit flags win over it"""
    seed: int = 0
    """seed of python, numpy, torch and the environment"""
    total_timesteps: int = 200_000
    """environment steps of the generated offline dataset (2,000 episodes of 100 steps)"""
    cuda: bool = True
    """use CUDA if available (fp32 matmuls and convolutions then run in TF32: float32_matmul_precision high)"""
    torch_deterministic: bool = False
    """torch.backends.cudnn.deterministic and deterministic algorithms"""
    bf16: bool = False
    """bf16 autocast for the forward passes, CUDA or a CPU with bf16 units (losses and optimizer state stay fp32)"""
    capture_video: bool = False
    """log every evaluation episode's frames beside its goal (media/eval)"""
    save_model: bool = True
    """write runs/<run>/checkpoint.pt every checkpoint_every updates and at exit"""
    resume: str | None = None
    """a run directory to continue (same env id); its dataset, model and evaluation results are reloaded"""
    eval_episodes: int = 50
    """goal-reaching evaluation episodes; 0: none"""
    log_every: int = 100
    """updates between logged losses"""
    video_every: int = 1_000
    """updates between open-loop videos (media/openloop; needs --decoder); 0: none"""
    checkpoint_every: int = 1_000
    """updates between checkpoints"""

    # data
    dataset: str | None = None
    """a directory of episodes (common/replay.py format with `proprio` and `state`) to train on instead of generating"""
    episode_length: int = 100
    """environment steps per generated episode"""
    frameskip: int = 5
    """environment steps per model step; the model's action is the concatenation of these actions"""
    goal_h: int = 5
    """model steps of random actions from the start that define an evaluation goal"""

    # encoder (DINOv2 ViT-S/14)
    encoder: str = "dino"
    """dino (frozen ViT-S/14) | pixels (the planner's baseline: raw 14×14 pixel patches as the features)"""
    encoder_weights: str | None = None
    """state dict of DINOv2 ViT-S/14 in the official key layout; None = random initialisation (deviation 1)"""
    image_size: int = 196
    """frames are resized to this (196 = 14 patches of 14 px, as officially for 224-px data)"""
    frame_size: int = 224
    """rendered / stored frame size"""

    # predictor (official conf/predictor/vit.yaml)
    num_hist: int = 3
    """frames of history the predictor sees"""
    depth: int = 6
    """predictor transformer blocks"""
    heads: int = 16
    """predictor attention heads"""
    dim_head: int = 64
    """width of each head"""
    mlp_dim: int = 2048
    """predictor MLP width"""
    dropout: float = 0.1
    """predictor attention and MLP dropout"""
    action_emb: int = 10
    """action embedding size (concatenated to every patch)"""
    proprio_emb: int = 10
    """proprioception embedding size (concatenated to every patch)"""
    decoder: bool = False
    """train a visualisation decoder on detached features (open-loop videos)"""

    # training
    batch_size: int = 32
    """sequences of num_hist + 1 model frames per batch"""
    train_steps: int = 20_000
    """predictor updates; 0: none"""
    predictor_lr: float = 5e-4
    """learning rate of the predictor"""
    encoder_lr: float = 5e-4
    """learning rate of the action and proprio embeddings"""
    decoder_lr: float = 3e-4
    """learning rate of the decoder"""
    precompute_features: bool = False
    """encode the whole dataset once (frozen encoder; same result as per batch, more memory)"""

    # planning (MPC with CEM)
    horizon: int = 5
    """planning horizon in model steps"""
    samples: int = 300
    """CEM samples per iteration"""
    elites: int = 30
    """CEM elites"""
    cem_iters: int = 0
    """CEM iterations per plan; 0 = the paper's per env (30 PushT, 10 PointMaze and Wall)"""
    var_scale: float = 1.0
    """initial CEM standard deviation"""
    execute_steps: int = 5
    """planned model steps executed before replanning (official n_taken_actions)"""
    max_replans: int = 5
    """plans per evaluation episode before it counts as a failure"""
    alpha: float = 0.1
    """weight of the proprioception term of the planning cost"""
    planner: str = "cem"
    """cem | random (the baseline: uniformly random actions)"""


PRESETS = {
    "paper": {},
    "small": dict(
        total_timesteps=10_000, episode_length=50, image_size=56, frame_size=64, depth=3, heads=4, dim_head=32,
        mlp_dim=512, batch_size=32, train_steps=3_000, precompute_features=True, samples=100, elites=10,
        cem_iters=5, max_replans=3, eval_episodes=20, log_every=100, checkpoint_every=500, video_every=1_000,
    ),
}


def default_preset(env_id: str) -> str:
    """Every env id here is one of the paper's tasks: the paper preset, on any hardware; --preset small for a CPU."""
    return "paper"


def check_args(args: Args) -> None:
    """Each numeric flag in its range, before a run directory is made or an env built (common/run.py require)."""
    require(args, "≥ 1", lambda v: v >= 1, "total_timesteps", "log_every", "checkpoint_every", "episode_length",
            "frameskip", "goal_h", "frame_size", "num_hist", "depth", "heads", "dim_head", "mlp_dim", "action_emb",
            "proprio_emb", "batch_size", "horizon", "samples", "max_replans")
    require(args, "a positive multiple of the 14-px patch", lambda v: v >= 14 and v % 14 == 0, "image_size")
    require(args, f"in 2 … --samples ({args.samples})", lambda v: 2 <= v <= args.samples, "elites")
    require(args, f"in 1 … --horizon ({args.horizon})", lambda v: 1 <= v <= args.horizon, "execute_steps")
    require(args, "≥ 0 (0: off)", lambda v: v >= 0, "eval_episodes", "video_every", "train_steps")
    require(args, "≥ 0 (0: 30 on PushT, else 10)", lambda v: v >= 0, "cem_iters")
    require(args, "≥ 0", lambda v: v >= 0, "seed", "alpha")
    require(args, "> 0", lambda v: v > 0, "predictor_lr", "encoder_lr", "decoder_lr", "var_scale")
    require(args, "in [0, 1)", lambda v: 0 <= v < 1, "dropout")


# Encoder: DINOv2 ViT-S/14 in the official module and parameter names
class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DinoAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class DinoMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DinoBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), DinoAttention(dim, heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), DinoMlp(dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class DinoV2(nn.Module):
    """ViT-S/14: 12 blocks, width 384, 6 heads, layer scale; returns the final-normed patch tokens
    (`x_norm_patchtokens`, the features DINO-WM uses)."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, patch: int = 14, pretrain_grid: int = 37):
        super().__init__()
        self.patch, self.emb_dim = patch, dim
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + pretrain_grid**2, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference, part of the official layout
        self.blocks = nn.ModuleList(DinoBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos_embedding(self, gh: int, gw: int):
        """The class token's embedding and the patch embeddings resized (bicubic) to a gh × gw grid."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        m = int(math.sqrt(grid.shape[1]))
        if (gh, gw) != (m, m):
            grid = F.interpolate(grid.reshape(1, m, m, -1).permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic",
                                 align_corners=False).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([cls, grid], 1)

    def forward(self, x):  # x (N, 3, H, W) in [-1, 1]
        x = self.patch_embed.proj(x)
        gh, gw = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)
        x = x + self.pos_embedding(gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]


class PixelPatches(nn.Module):
    """The baseline 'encoder': each 14×14 patch's raw pixels, flattened (588 features)."""

    def __init__(self, patch: int = 14):
        super().__init__()
        self.patch, self.emb_dim = patch, 3 * patch * patch

    def forward(self, x):
        return F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)


def load_encoder_weights(encoder: DinoV2, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"--encoder-weights '{path}' is not a DINOv2 ViT-S/14 state dict: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")


def preprocess(frames, image_size: int):
    """uint8 (N, 3, H, W) -> float in [-1, 1] resized to image_size (official: Normalize(0.5, 0.5), Resize)."""
    x = frames.float() / 255.0
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x * 2 - 1


# Predictor: ViT with frame-causal attention (official models/vit.py)
def frame_causal_mask(num_frames: int, patches: int) -> torch.Tensor:
    """(F·P, F·P) bool: a token of frame i may attend to every token of frames ≤ i."""
    frame = torch.arange(num_frames * patches) // patches
    return frame[None, :] <= frame[:, None]


def masked_attention(q, k, v, mask, drop: float):
    """softmax(q kᵀ/√d, keys where `mask` is False left out) v, with dropout `drop` on the probabilities."""
    if drop > 0 and q.device.type == "cpu":
        # speed (CPU): written out; PyTorch's CPU attention with dropout is unfused and upcasts to fp32, and took most
        # of a paper-size training step. The plain form is the line below, which CUDA runs fused (written out there,
        # the probabilities of a paper-size batch would take ~10 GB).
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return F.dropout(att.masked_fill(~mask, float("-inf")).softmax(-1), drop) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = masked_attention(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Predictor(nn.Module):
    def __init__(self, num_frames: int, patches: int, dim: int, args: Args):
        super().__init__()
        self.patches = patches
        self.pos_embedding = nn.Parameter(torch.randn(1, num_frames * patches, dim))
        self.layers = nn.ModuleList(nn.ModuleList([
            Attention(dim, args.heads, args.dim_head, args.dropout),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, args.mlp_dim), nn.GELU(), nn.Dropout(args.dropout),
                          nn.Linear(args.mlp_dim, dim), nn.Dropout(args.dropout))]) for _ in range(args.depth))
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("mask", frame_causal_mask(num_frames, patches), persistent=False)

    def forward(self, z):
        """z (B, T, P, D), T ≤ num_hist -> (B, T, P, D): the output at frame t predicts frame t+1."""
        b, t, p, d = z.shape
        n = t * p
        x = z.reshape(b, n, d) + self.pos_embedding[:, :n]
        mask = self.mask[:n, :n]
        for attn, ff in self.layers:
            x = x + attn(x, mask)
            x = x + ff(x)
        return self.norm(x).view(b, t, p, d)


class WorldModel(nn.Module):
    """Frozen encoder + trained action/proprio embeddings (official ProprioceptiveEmbedding: a 1×1 Conv1d, i.e.
    a linear map per time step) + predictor + optional decoder. Latent per frame: (P, D_enc + E_p + E_a)."""

    def __init__(self, encoder: nn.Module, proprio_dim: int, action_dim: int, patches: int, args: Args):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.enc_dim, self.image_size, self.num_hist = encoder.emb_dim, args.image_size, args.num_hist
        self.proprio_encoder = nn.Linear(proprio_dim, args.proprio_emb)
        self.action_encoder = nn.Linear(action_dim * args.frameskip, args.action_emb)
        self.act_dim = args.action_emb
        dim = self.enc_dim + args.proprio_emb + args.action_emb
        self.predictor = Predictor(args.num_hist, patches, dim, args)
        self.decoder = None
        if args.decoder:  # per patch: features -> 14×14×3 pixels (deviation 4)
            side = args.image_size // encoder.patch
            self.decoder = nn.Sequential(nn.Linear(self.enc_dim, 256), nn.GELU(), nn.Linear(256, 3 * encoder.patch**2))
            self.side, self.patch = side, encoder.patch
        for name in ("action_mean", "action_std", "proprio_mean", "proprio_std"):
            size = action_dim * args.frameskip if name.startswith("action") else proprio_dim
            self.register_buffer(name, torch.zeros(size) if name.endswith("mean") else torch.ones(size))

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen, always in inference mode
        return self

    @torch.no_grad()
    def encode_frames(self, frames):
        """uint8 (..., 3, H, W) -> patch features (..., P, D_enc), without gradient (the encoder is frozen)."""
        lead = frames.shape[:-3]
        feats = self.encoder(preprocess(frames.reshape(-1, *frames.shape[-3:]), self.image_size))
        return feats.reshape(*lead, *feats.shape[1:])

    def latent(self, feats, proprio, action):
        """feats (B, T, P, D_enc), raw proprio (B, T, Pd), raw grouped action (B, T, A·f) -> z (B, T, P, D):
        each patch ⊕ the frame's proprio embedding ⊕ the frame's action embedding."""
        p = feats.shape[2]
        e_p = self.proprio_encoder((proprio - self.proprio_mean) / self.proprio_std)
        e_a = self.action_encoder((action - self.action_mean) / self.action_std)
        return torch.cat([feats, e_p[:, :, None].expand(-1, -1, p, -1), e_a[:, :, None].expand(-1, -1, p, -1)], -1)

    def with_action(self, z, normalized_action):
        """Replace the action part of z (B, T, P, D) by the embedding of normalised actions (B, T, A·f)."""
        e_a = self.action_encoder(normalized_action)
        return torch.cat([z[..., :-self.act_dim], e_a[:, :, None].expand(-1, -1, z.shape[2], -1)], -1)

    def decode(self, feats):
        """(N, P, D_enc) -> frames in [0, 1] (N, 3, S, S)."""
        pix = self.decoder(feats)  # (N, P, 3·p·p)
        img = F.fold(pix.transpose(1, 2), (self.side * self.patch,) * 2, self.patch, stride=self.patch)
        return (img + 1) / 2


def prediction_loss(wm: WorldModel, z) -> tuple[torch.Tensor, dict]:
    """Teacher-forced next-frame loss (paper Eq. 2; official z_loss): the predictor's outputs for frames
    0..H-1 against the latents of frames 1..H, over the visual and proprio dims (the action dims excluded),
    targets detached."""
    z_src, z_tgt = z[:, :wm.num_hist], z[:, 1:wm.num_hist + 1].detach()
    z_pred = wm.predictor(z_src)
    a = wm.act_dim
    loss = F.mse_loss(z_pred[..., :-a].float(), z_tgt[..., :-a].float())
    visual = F.mse_loss(z_pred[..., :wm.enc_dim].float(), z_tgt[..., :wm.enc_dim].float())
    proprio = F.mse_loss(z_pred[..., wm.enc_dim:-a].float(), z_tgt[..., wm.enc_dim:-a].float())
    return loss, dict(z_loss=loss, z_visual_loss=visual, z_proprio_loss=proprio)


@torch.no_grad()
def rollout(wm: WorldModel, z0, actions):
    """Official VWorldModel.rollout. z0 (B, 1, P, D) built with actions[:, 0]; actions (B, H, A·f) normalised.
    Predicts autoregressively from the last num_hist frames, inserting each next action; returns the H + 1
    latents, the last one the prediction after all H actions."""
    z = wm.with_action(z0, actions[:, :1])
    for t in range(1, actions.shape[1]):
        z_new = wm.predictor(z[:, -wm.num_hist:])[:, -1:]
        z = torch.cat([z, wm.with_action(z_new, actions[:, t:t + 1])], 1)
    return torch.cat([z, wm.predictor(z[:, -wm.num_hist:])[:, -1:]], 1)


def planning_cost(wm: WorldModel, z_final, z_goal, alpha: float):
    """Official objective_fn_last: MSE of the final predicted visual features to the goal's, plus α times the
    MSE of the proprio embeddings. z_final (N, P, D), z_goal (1, P, D) -> (N,)."""
    e, a = wm.enc_dim, wm.act_dim
    visual = (z_final[..., :e] - z_goal[..., :e]).pow(2).mean((-2, -1))
    proprio = (z_final[..., e:-a] - z_goal[..., e:-a]).pow(2).mean((-2, -1))
    return visual + alpha * proprio


def cem(cost_fn, horizon: int, action_dim: int, samples: int, elites: int, iters: int, var_scale: float,
        low, high, generator=None):
    """Cross-entropy method (official CEMPlanner): Gaussian over action sequences from N(0, var_scale²); each
    iteration scores `samples` sequences (the first is the mean itself) and refits mean and std to the
    `elites` cheapest. Samples are clipped to [low, high] (deviation 3). Returns the final mean (H, A)."""
    mu = torch.zeros(horizon, action_dim, device=low.device)
    sigma = var_scale * torch.ones(horizon, action_dim, device=low.device)
    for _ in range(iters):
        noise = torch.randn(samples, horizon, action_dim, device=low.device, generator=generator)
        actions = torch.maximum(torch.minimum(mu + sigma * noise, high), low)
        actions[0] = mu
        cost = cost_fn(actions)
        elite = actions[torch.topk(cost, elites, largest=False).indices]
        mu, sigma = elite.mean(0), elite.std(0)
    return mu


# Offline data
def smooth_random_actions(rng: np.random.Generator, steps: int, action_dim: int, prev=None) -> np.ndarray:
    """a_t = clip(a_{t-1} + 0.3 ε_t, -1, 1): a random policy that actually travels (deviation 2)."""
    a = np.zeros(action_dim) if prev is None else np.asarray(prev, np.float64)
    out = np.empty((steps, action_dim), np.float32)
    for t in range(steps):
        a = np.clip(a + 0.3 * rng.standard_normal(action_dim), -1, 1)
        out[t] = a
    return out


def collect_episode(env, seed: int, length: int) -> dict:
    """One episode in the common/replay.py layout plus per-row `proprio` and `state`."""
    rng = np.random.default_rng(seed)
    frame, proprio = env.reset(seed)
    rows = dict(obs=[frame], action=[np.zeros(env.action_dim, np.float32)], proprio=[proprio], state=[env.state()])
    for a in smooth_random_actions(rng, length, env.action_dim):
        frame, proprio = env.step(a)
        rows["obs"].append(frame), rows["action"].append(a), rows["proprio"].append(proprio), rows["state"].append(env.state())
    ep = {k: np.stack(v) for k, v in rows.items()}
    n = len(ep["obs"])
    ep.update(reward=np.zeros(n, np.float32), terminated=np.zeros(n, bool), truncated=np.arange(n) == n - 1,
              is_first=np.arange(n) == 0)
    return ep


def window_starts(episode_lengths, frames: int, frameskip: int) -> np.ndarray:
    """(episode, first row) of every window of `frames` model frames whose actions are all held: rows
    s, s+f, …, s+(frames-1)·f and the actions up to row s+frames·f."""
    out = []
    for e, n in enumerate(episode_lengths):
        last = n - 1 - frames * frameskip
        out += [(e, s) for s in range(last + 1)]
    return np.array(out, np.int64).reshape(-1, 2)


def gather_window(episodes: list, e: int, s: int, frames: int, f: int) -> dict:
    """Model frames k = 0..frames-1 of the window at row s: obs/proprio at row s + f·k and the grouped action
    = concat(action rows s + f·k + 1 … s + f·k + f), the actions taken after frame k."""
    ep = episodes[e]
    rows = s + f * np.arange(frames)
    act_rows = rows[:, None] + 1 + np.arange(f)[None]
    return dict(rows=rows, obs=ep["obs"][rows], proprio=ep["proprio"][rows],
                action=ep["action"][act_rows].reshape(frames, -1))


# Evaluation: MPC with CEM towards a goal image
def make_goal(env, rng, episode_seed: int, args: Args):
    """Start = the env's reset; goal = the state after goal_h·frameskip smooth random actions (paper §4)."""
    env.reset(episode_seed)
    start = env.state()
    for a in smooth_random_actions(rng, args.goal_h * args.frameskip, env.action_dim):
        env.step(a)
    goal = env.state()
    goal_frame, goal_proprio = env.set_state(goal)
    frame, proprio = env.set_state(start)
    return start, goal, (goal_frame, goal_proprio), (frame, proprio)


def plan_episode(wm: WorldModel, env, goal_state, goal_obs, obs, args: Args, device, rng, frames_out=None):
    """Replan up to max_replans times; execute execute_steps model steps of each plan; success is the env's test
    after each executed chunk (official MPCPlanner + evaluator). Returns (success, env steps taken)."""
    iters = args.cem_iters or (30 if args.env_id == "PushT-v0" else 10)
    a_dim = env.action_dim * args.frameskip
    low = ((-1 - wm.action_mean) / wm.action_std).to(device)
    high = ((1 - wm.action_mean) / wm.action_std).to(device)

    def as_t(x):
        return torch.as_tensor(np.asarray(x), device=device)[None]

    with torch.no_grad():  # the goal is encoded once per episode
        z_goal = wm.latent(wm.encode_frames(as_t(goal_obs[0]))[:, None], as_t(goal_obs[1])[:, None],
                           torch.zeros(1, 1, a_dim, device=device))[:, 0]
    steps = 0
    for _ in range(args.max_replans):
        if args.planner == "random":
            plan = rng.uniform(-1, 1, (args.execute_steps, a_dim)).astype(np.float32)
        else:
            with torch.no_grad():  # the start frame is encoded once per replan, then repeated for every sample
                feats = wm.encode_frames(as_t(obs[0]))[:, None]
                z0 = wm.latent(feats, as_t(obs[1])[:, None], torch.zeros(1, 1, a_dim, device=device))

                def cost(acts):  # the final predicted latent of each sampled sequence against the goal
                    return planning_cost(wm, rollout(wm, z0.expand(len(acts), -1, -1, -1), acts)[:, -1], z_goal, args.alpha)

                mu = cem(cost, args.horizon, a_dim, args.samples, args.elites, iters, args.var_scale, low, high)
            plan = (mu * wm.action_std + wm.action_mean).clamp(-1, 1).cpu().numpy()[:args.execute_steps]
        for group in plan:
            for a in group.reshape(args.frameskip, env.action_dim):
                obs = env.step(a)
                steps += 1
                if frames_out is not None:
                    frames_out.append(obs[0])
        if env.success(goal_state):
            return True, steps
    return False, steps


def main(args: Args):
    check_args(args)
    if args.env_id not in GOAL_ENV_IDS:
        raise SystemExit(f"DINO-WM plans towards goal images in {', '.join(GOAL_ENV_IDS)}; '{args.env_id}' is not one "
                         "of them (a vector or reward-only env has no goal image).")
    if args.encoder not in ("dino", "pixels") or args.planner not in ("cem", "random"):
        raise SystemExit("--encoder must be dino or pixels, and --planner cem or random.")
    if args.encoder_weights and not os.path.isfile(args.encoder_weights):
        raise SystemExit(f"--encoder-weights '{args.encoder_weights}' is not a file.")
    env = make_goal_env(args.env_id, args.frame_size)
    run_dir, resumed = open_run(args)
    seed_everything(args.seed, args.torch_deterministic)
    device = choose_device(args.cuda)
    stop = []  # SIGTERM / Ctrl-C set this; the run stops between episodes or updates, never inside one
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))

    # 1. the offline dataset (generated here unless --dataset is given), one file per episode
    episodes_dir = args.dataset or os.path.join(run_dir, "episodes")
    n_episodes = max(1, args.total_timesteps // args.episode_length)
    if args.dataset is None:
        os.makedirs(episodes_dir, exist_ok=True)
        done = len([n for n in os.listdir(episodes_dir) if n.endswith(".npz") and not n.endswith("p.npz")])
        if done < n_episodes:
            print(f"dataset: generating episodes {done}..{n_episodes - 1} of {args.episode_length} steps in {episodes_dir}")
        t0 = time.time()
        for i in range(done, n_episodes):  # each episode written atomically: a stop loses at most the current one
            if stop:
                raise SystemExit(130)
            ep = collect_episode(env, args.seed * 100_000 + i, args.episode_length)
            save_episode(os.path.join(episodes_dir, f"{i:06d}-{len(ep['obs'])}.npz"), ep)
            if (i + 1) % max(1, n_episodes // 10) == 0:
                print(f"  {i + 1}/{n_episodes} episodes ({time.time() - t0:.0f} s)", flush=True)
    names = sorted(n for n in os.listdir(episodes_dir) if n.endswith(".npz"))
    episodes = [load_episode(os.path.join(episodes_dir, n)) for n in names]
    if not episodes or "proprio" not in episodes[0]:
        raise SystemExit(f"'{episodes_dir}' holds no episodes with `proprio` (common/replay.py format).")
    frames_needed = args.num_hist + 1
    starts = window_starts([len(e["obs"]) for e in episodes], frames_needed, args.frameskip)
    if len(starts) == 0:
        raise SystemExit(f"No episode is long enough for {frames_needed} frames × frameskip {args.frameskip}.")

    # 2. the model
    encoder = DinoV2() if args.encoder == "dino" else PixelPatches()
    if args.encoder == "dino":
        if args.encoder_weights:
            load_encoder_weights(encoder, args.encoder_weights)
            print(f"encoder: DINOv2 ViT-S/14 weights from {args.encoder_weights}")
        else:
            print("WARNING: encoder: DINOv2 ViT-S/14 with RANDOM weights (no --encoder-weights given): these are not "
                  "pre-trained features, and results are not the paper's (deviation 1)")
    patches = (args.image_size // 14) ** 2
    wm = WorldModel(encoder, env.proprio_dim, env.action_dim, patches, args).to(device)
    groups = [dict(params=list(wm.predictor.parameters()), lr=args.predictor_lr),
              dict(params=list(wm.action_encoder.parameters()) + list(wm.proprio_encoder.parameters()), lr=args.encoder_lr)]
    if wm.decoder is not None:
        groups.append(dict(params=list(wm.decoder.parameters()), lr=args.decoder_lr))
    opt = torch.optim.AdamW(groups)
    updates, results = 0, []
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resumed:
        ckpt = load_checkpoint(ckpt_path, device, wm=wm, opt=opt)
        updates, results = ckpt["updates"], ckpt["results"]
        print(f"resumed {run_dir} at update {updates}, {len(results)} evaluation episodes done; "
              f"{sum(len(e['obs']) for e in episodes)} dataset rows reloaded")
    else:  # normalisation statistics of the dataset (official: actions and proprio normalised by mean/std)
        acts = np.concatenate([e["action"][1:] for e in episodes])
        prop = np.concatenate([e["proprio"] for e in episodes])
        wm.action_mean.copy_(torch.as_tensor(np.tile(acts.mean(0), args.frameskip)))
        wm.action_std.copy_(torch.as_tensor(np.tile(acts.std(0) + 1e-6, args.frameskip)))
        wm.proprio_mean.copy_(torch.as_tensor(prop.mean(0)))
        wm.proprio_std.copy_(torch.as_tensor(prop.std(0) + 1e-6))
    writer = make_writer(run_dir, args, resumed)
    print(f"run: {run_dir}  preset: {args.preset}  {len(episodes)} episodes, {len(starts)} windows; {patches} patches "
          f"of {wm.enc_dim} features; predictor {args.depth}×{args.heads}×{args.dim_head}")

    def save():
        if args.save_model:
            save_checkpoint(ckpt_path, dict(wm=wm.state_dict(), opt=opt.state_dict(), updates=updates, results=results,
                                            global_step=n_episodes * args.episode_length, args=vars(args)))
        return ckpt_path

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    rng = np.random.default_rng(args.seed + updates)
    features = None
    if args.precompute_features and updates < args.train_steps:
        t0 = time.time()
        features = [torch.cat([wm.encode_frames(torch.as_tensor(e["obs"][i:i + 256], device=device))
                               for i in range(0, len(e["obs"]), 256)]) for e in episodes]
        print(f"features of {sum(len(e['obs']) for e in episodes)} frames computed once ({time.time() - t0:.0f} s)")

    def batch_latents(idx):
        """Frames (uint8), their features and latents z for the windows starts[idx]."""
        wins = [gather_window(episodes, e, s, frames_needed, args.frameskip) for e, s in starts[idx]]
        batch = to_device({k: np.stack([w[k] for w in wins]) for k in ("obs", "proprio", "action")}, device)
        if features is not None:
            feats = torch.stack([features[e][w["rows"]] for (e, _), w in zip(starts[idx], wins)])
        else:
            feats = wm.encode_frames(batch["obs"])
        return batch["obs"], feats, wm.latent(feats, batch["proprio"], batch["action"])

    try:
        # 3. training (official train.py: teacher-forced next-frame prediction)
        wm.train()
        t0, sums = time.perf_counter(), {}
        while updates < args.train_steps:
            if stop:
                raise KeyboardInterrupt
            idx = rng.integers(0, len(starts), args.batch_size)
            with autocast:
                obs, feats, z = batch_latents(idx)
                loss, metrics = prediction_loss(wm, z)
                if wm.decoder is not None:  # visualisation only: trained on detached features
                    target = preprocess(obs.flatten(0, 1), args.image_size)
                    recon = wm.decode(feats.detach().flatten(0, 1)) * 2 - 1
                    metrics["decoder_loss"] = F.mse_loss(recon.float(), target)
                    loss = loss + metrics["decoder_loss"]
            check_finite({"prediction_loss": loss}, updates, save)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            updates += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()  # device tensors, read when logged
            if updates % args.log_every == 0:
                for k, v in sums.items():
                    writer.add_scalar(f"world_model/{k}", float(v) / args.log_every, updates)
                ms = 1000 * (time.perf_counter() - t0) / args.log_every
                writer.add_scalar("perf/train_step_ms", ms, updates)
                print(f"update {updates}/{args.train_steps}  z_loss {float(sums['z_loss']) / args.log_every:.4f}  {ms:.0f} ms/update",
                      flush=True)
                t0, sums = time.perf_counter(), {}
            if wm.decoder is not None and args.video_every and updates % args.video_every == 0:
                add_video(writer, "media/openloop", openloop_video(wm, episodes, starts, rng, args, device), updates)
            if args.save_model and updates % args.checkpoint_every == 0:
                save()
        features = None

        # 4. evaluation: goal reaching by MPC with CEM, one result per episode, resumable
        wm.eval()
        eval_env_rng = np.random.default_rng(args.seed + 77)
        for _ in range(len(results)):  # keep the goal stream identical across a resume
            eval_env_rng.standard_normal((args.goal_h * args.frameskip, env.action_dim))
        while len(results) < args.eval_episodes:
            if stop:
                raise KeyboardInterrupt
            i = len(results)
            t0 = time.time()
            start, goal, goal_obs, obs = make_goal(env, eval_env_rng, 10_000 + args.seed * 1000 + i, args)
            frames = [obs[0]] if args.capture_video else None
            with autocast:
                success, steps = plan_episode(wm, env, goal, goal_obs, obs, args, device, rng, frames)
            results.append(dict(success=success, steps=steps, seconds=time.time() - t0))
            writer.add_scalar("eval/success", float(success), i)
            if frames is not None:
                video = np.stack([np.concatenate([f, goal_obs[0]], -1) for f in frames])
                add_video(writer, "media/eval", video, i)
            print(f"eval episode {i}: {'success' if success else 'failure'} after {steps} steps ({time.time() - t0:.0f} s)",
                  flush=True)
            save()
    except KeyboardInterrupt:
        print(f"interrupted at update {updates}, {len(results)} evaluation episodes; saving checkpoint")
        save()
        writer.close()
        env.close()
        sys.exit(130)
    save()
    if results:
        rate = float(np.mean([r["success"] for r in results]))
        writer.add_scalar("eval/success_rate", rate, updates)
        print(f"eval: success rate {rate:.2f} over {len(results)} episodes ({args.planner} planner, {args.encoder} encoder)")
    writer.close()
    env.close()


@torch.no_grad()
def openloop_video(wm: WorldModel, episodes, starts, rng, args: Args, device):
    """One window: real frames (top) and the decoder's view of predictions rolled out from the first frame with
    the real actions (bottom)."""
    e, s = starts[rng.integers(len(starts))]
    n = min(len(episodes[e]["obs"]) - 1 - s, 8 * args.frameskip) // args.frameskip
    w = gather_window(episodes, e, s, n, args.frameskip)
    obs = torch.as_tensor(w["obs"], device=device)
    z = wm.latent(wm.encode_frames(obs)[None], torch.as_tensor(w["proprio"], device=device)[None],
                  torch.as_tensor(w["action"], device=device)[None])
    norm_actions = (torch.as_tensor(w["action"], device=device)[None] - wm.action_mean) / wm.action_std
    pred = rollout(wm, z[:, :1], norm_actions[:, :n - 1])[0, :, :, :wm.enc_dim]
    real = preprocess(obs, args.image_size).add(1).div(2)
    video = torch.cat([real, wm.decode(pred).clamp(0, 1)], 2)
    return (video * 255).to(torch.uint8).cpu()


if __name__ == "__main__":
    main(parse_args(Args, PRESETS, default_preset))
