"""DreamerV2: hand-computed math tests of the losses and targets, and smoke runs of the real script."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces

from tests.helpers import (
    check_resume_doubles_the_run, checkpoint, events, kill_and_resume, only_run_dir, run_script, script,
    stop_in_process,
)
import dreamer_v2 as d  # noqa: E402  (tests.helpers puts algos/ on the path)

SCRIPT = script("dreamer_v2.py")


def tiny_args(**kw):
    base = dict(deter=16, hidden=16, stoch=4, classes=3, mlp_layers=1, mlp_units=16, cnn_depth=4, horizon=3,
                gamma=0.9, pred_discount=True, reward_transform="identity")
    return dataclasses.replace(d.Args(), **{**base, **kw})


# λ-return, Eq. 4 --------------------------------------------------------------------------------
def test_lambda_return_hand_computed_with_a_predicted_termination():
    # t:          0    1    2    3
    reward = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    value = torch.tensor([10.0, 20.0, 30.0, 40.0])[:, None]
    discount = torch.tensor([0.9, 0.9, 0.0, 0.9])[:, None]  # ẑ_2 is predicted terminal
    returns = d.lambda_return(reward, value, discount, lambda_=0.5)
    # V_2 = r_2 + 0 = 3;  V_1 = 2 + 0.9 (0.5·30 + 0.5·3) = 16.85;  V_0 = 1 + 0.9 (0.5·20 + 0.5·16.85) = 17.5825
    np.testing.assert_allclose(returns[:, 0].numpy(), [17.5825, 16.85, 3.0], rtol=1e-6)
    # λ = 1: discounted sum of rewards bootstrapped by v_H, cut at the termination
    np.testing.assert_allclose(d.lambda_return(reward, value, discount, 1.0)[:, 0].numpy(),
                               [1 + 0.9 * (2 + 0.9 * 3), 2 + 0.9 * 3, 3.0], rtol=1e-6)
    # λ = 0: one-step targets r_t + γ_t v_{t+1}
    np.testing.assert_allclose(d.lambda_return(reward, value, discount, 0.0)[:, 0].numpy(),
                               [1 + 0.9 * 20, 2 + 0.9 * 30, 3.0], rtol=1e-6)


def test_trajectory_weight_is_the_product_of_earlier_discounts():
    discount = torch.tensor([0.9, 0.5, 0.0, 0.9])[:, None]
    np.testing.assert_allclose(d.trajectory_weight(discount)[:, 0].numpy(), [1.0, 0.9, 0.45, 0.0])


# KL balancing -----------------------------------------------------------------------------------
def test_kl_balancing_sends_0_8_of_the_gradient_to_the_prior_and_0_2_to_the_posterior():
    torch.manual_seed(0)
    post = torch.randn(5, 4, 3, requires_grad=True)
    prior = torch.randn(5, 4, 3, requires_grad=True)
    loss, value = d.kl_balanced_loss(post, prior, balance=0.8, free=0.0)
    g_post, g_prior = torch.autograd.grad(loss, [post, prior])
    plain = d.kl_categorical(post, prior).mean()
    p_post, p_prior = torch.autograd.grad(plain, [post, prior])
    torch.testing.assert_close(g_prior, 0.8 * p_prior)
    torch.testing.assert_close(g_post, 0.2 * p_post)
    # the KL value matches the categorical closed form Σ q (log q − log p)
    q, p = F.softmax(post, -1), F.softmax(prior, -1)
    torch.testing.assert_close(value, (q * (q.log() - p.log())).sum((-2, -1)).mean().detach())


def test_free_nats_clip_the_mean_kl():
    post = torch.zeros(2, 4, 3, requires_grad=True)
    prior = (0.1 * torch.ones(2, 4, 3)).requires_grad_()
    loss, _ = d.kl_balanced_loss(post, prior + torch.tensor([0.0, 0.1, 0.0]), balance=0.8, free=1.0)
    assert loss.item() == pytest.approx(1.0)
    assert torch.autograd.grad(loss, post)[0].abs().sum() == 0


# Straight-through categorical latents and actions ------------------------------------------------
def test_straight_through_sample_is_one_hot_with_the_gradient_of_the_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(64, 32, 32, requires_grad=True)
    sample = d.straight_through_sample(logits)
    hard = sample.detach()
    assert torch.allclose(hard.sum(-1), torch.ones(64, 32))
    assert torch.allclose(hard, hard.round(), atol=1e-6)
    w = torch.randn(32)
    (grad,) = torch.autograd.grad((sample * w).sum(), logits)
    (expected,) = torch.autograd.grad((F.softmax(logits, -1) * w).sum(), logits)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected)


def test_straight_through_sample_follows_the_probabilities():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3])).expand(20_000, 1, 3)
    freq = d.straight_through_sample(logits).detach().mean((0, 1))
    np.testing.assert_allclose(freq.numpy(), [0.1, 0.6, 0.3], atol=0.015)


# Actor and critic losses ---------------------------------------------------------------------------
def test_reinforce_loss_value_sign_and_stopped_gradients():
    log_prob = torch.tensor([[-1.0], [-2.0]], requires_grad=True)
    entropy = torch.tensor([[0.5], [0.7]], requires_grad=True)
    returns = torch.tensor([[3.0], [1.0]], requires_grad=True)
    baseline = torch.tensor([[1.0], [2.0]], requires_grad=True)
    weight = torch.tensor([[1.0], [0.5]])
    loss = d.actor_loss_reinforce(log_prob, entropy, returns, baseline, weight, eta=0.1)
    # −mean(w (lp · (R − b) + η H)) = −((−1·2 + 0.05) + 0.5 (−2·−1 + 0.07)) / 2
    assert loss.item() == pytest.approx(-((-2 + 0.05) + 0.5 * (2 + 0.07)) / 2)
    g_lp, g_ret, g_base = torch.autograd.grad(loss, [log_prob, returns, baseline], allow_unused=True)
    assert g_lp[0, 0] < 0 < g_lp[1, 0]  # positive advantage: raise the log-probability; negative: lower it
    assert g_ret is None and g_base is None  # the advantage is a constant for the actor


def test_critic_loss_regresses_stopped_lambda_returns_with_weights():
    value = torch.tensor([[1.0], [2.0]], requires_grad=True)
    returns = torch.tensor([[3.0], [2.0]], requires_grad=True)
    loss = d.critic_loss(value, returns, torch.tensor([[1.0], [0.0]]))
    assert loss.item() == pytest.approx(0.5 * 0.5 * 4)
    g_v, g_r = torch.autograd.grad(loss, [value, returns], allow_unused=True)
    assert g_v[0, 0] == pytest.approx(-1.0) and g_v[1, 0] == 0 and g_r is None


def make_models(args, discrete=True, obs_dim=5, action_dim=3):
    torch.manual_seed(0)
    wm = d.WorldModel(spaces.Box(-1, 1, (obs_dim,), np.float32), action_dim, args)
    actor = d.Actor(wm.feat_dim, action_dim, discrete, args.mlp_layers, args.mlp_units)
    critic = d.mlp(wm.feat_dim, 1, args.mlp_layers, args.mlp_units)
    target = d.mlp(wm.feat_dim, 1, args.mlp_layers, args.mlp_units)
    return wm, actor, critic, target


def toy_batch(B=2, T=6, obs_dim=5, action_dim=3):
    torch.manual_seed(1)
    return dict(obs=torch.randn(B, T, obs_dim), action=F.one_hot(torch.randint(0, action_dim, (B, T)), action_dim).float(),
                reward=torch.randn(B, T), terminated=torch.zeros(B, T, dtype=torch.bool),
                is_first=torch.zeros(B, T, dtype=torch.bool))


def test_reinforce_baseline_is_the_slow_target_critic():
    args = tiny_args()
    wm, actor, critic, target = make_models(args)
    batch = toy_batch()
    post = {k: v.detach() for k, v in wm.rssm.observe(wm.embed(batch["obs"]), batch["action"], batch["is_first"])[0].items()}

    def actor_loss():
        torch.manual_seed(5)
        return d.behaviour_loss(wm, actor, critic, target, post, batch["terminated"], args, discrete=True)[0].item()

    before = actor_loss()
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(1.0)
    assert actor_loss() == before  # the online critic plays no part in the actor's loss
    with torch.no_grad():
        target[-1].bias.add_(1.0)
    assert actor_loss() != before  # the target critic is the baseline (and bootstraps the returns)


def test_dynamics_backprop_reaches_the_actor_but_never_updates_the_world_model():
    args = tiny_args(actor_grad="dynamics")
    wm, actor, critic, target = make_models(args, discrete=False)
    batch = toy_batch()
    batch["action"] = torch.rand(2, 6, 3) * 2 - 1
    post = wm.rssm.observe(wm.embed(batch["obs"]), batch["action"], batch["is_first"])[0]
    loss_actor, loss_critic, _ = d.behaviour_loss(wm, actor, critic, target, post, batch["terminated"], args, discrete=False)
    loss_actor.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.net[0].parameters())
    assert all(p.grad is None for p in wm.parameters()) and all(p.requires_grad for p in wm.parameters())
    # the gradient passes through the imagined dynamics: without it, the actor's gradient would be the entropy's alone
    ent_only = torch.autograd.grad(-args.actor_entropy * actor(torch.randn(1, wm.feat_dim)).entropy().mean(),
                                   actor.net[0].weight)[0]
    assert not torch.allclose(actor.net[0].weight.grad, ent_only)


def test_first_imagined_discount_comes_from_the_data():
    args = tiny_args(horizon=2)
    wm, actor, critic, target = make_models(args)
    with torch.no_grad():
        wm.discount[-1].bias.fill_(50.0)  # the head says "continues" everywhere
        target[-1].weight.zero_()
        target[-1].bias.fill_(100.0)
    feats = torch.randn(3, 2, wm.feat_dim)  # (H+1, N, F): start 1 is a real terminal state
    reward, discount, value, returns, weight = d.imagined_targets(wm, target, feats, torch.tensor([False, True]), args)
    np.testing.assert_allclose(discount[0].detach().numpy(), [0.9, 0.0])
    np.testing.assert_allclose(discount[1:].detach().numpy(), 1.0)
    assert returns[0, 1].item() == pytest.approx(reward[0, 1].item())  # a terminal start earns its own reward only
    assert returns[0, 0].item() > 50  # the other start bootstraps the large value
    np.testing.assert_allclose(weight[:, 1].detach().numpy(), [1.0, 0.0])


# World model ---------------------------------------------------------------------------------------
def test_rssm_state_and_previous_action_reset_where_is_first_is_set():
    args = tiny_args()
    wm, *_ = make_models(args)
    torch.manual_seed(2)
    embed = torch.randn(1, 5, wm.rssm.obs_out[0].in_features - args.deter)
    action = torch.randn(1, 5, 3) + 3  # large, non-zero previous actions
    is_first = torch.tensor([[True, False, False, True, False]])
    post, prior = wm.rssm.observe(embed, action, is_first)
    # where is_first, h_t = f(0, 0, 0): the same as the very first step, whatever came before
    fresh = wm.rssm.cell(wm.rssm.img_in(torch.zeros(1, args.stoch * args.classes + 3)), torch.zeros(1, args.deter))
    torch.testing.assert_close(prior["deter"][:, 0], fresh)
    torch.testing.assert_close(prior["deter"][:, 3], fresh)
    assert not torch.allclose(prior["deter"][:, 2], fresh)
    # without the flag the same step carries history and the previous action
    no_reset, _ = wm.rssm.observe(embed, action, torch.tensor([[True, False, False, False, False]]))
    assert not torch.allclose(no_reset["deter"][:, 3], fresh)


def test_world_model_targets_share_the_posterior_index():
    args = tiny_args(discount_scale=1.0)
    wm, *_ = make_models(args)
    batch = toy_batch(B=1, T=4)
    batch["terminated"][0, 2] = True
    torch.manual_seed(3)
    _, _, metrics = d.world_model_loss(wm, batch, args)
    torch.manual_seed(3)
    post, _ = wm.rssm.observe(wm.embed(batch["obs"]), batch["action"], batch["is_first"])
    feat = d.feature(post)
    logits = wm.discount(feat).squeeze(-1)
    target = torch.tensor([[0.9, 0.9, 0.0, 0.9]])  # γ (1 − terminated_t) at index t
    expected = F.binary_cross_entropy_with_logits(logits, target)
    assert metrics["discount_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    reward_nll = 0.5 * (wm.reward(feat).squeeze(-1) - batch["reward"]).pow(2).mean()
    assert metrics["reward_loss"].item() == pytest.approx(reward_nll.item(), rel=1e-6)
    shifted = 0.5 * (wm.reward(feat).squeeze(-1)[:, 1:] - batch["reward"][:, :-1]).pow(2).mean()
    assert metrics["reward_loss"].item() != pytest.approx(shifted.item(), rel=1e-3)


def test_truncated_normal_actor_is_bounded_and_reparameterised():
    loc = torch.tensor([[0.9, -0.5]], requires_grad=True)
    dist = d.TruncatedNormal(loc.expand(10_000, 2), torch.tensor([[0.5, 0.1]]).expand(10_000, 2))
    x = dist.rsample()
    assert x.abs().max() < 1
    assert torch.autograd.grad(x.sum(), loc)[0].abs().sum() > 0
    # its density integrates to one on [-1, 1], and its entropy matches −∫ p log p
    grid = torch.linspace(-1, 1, 20001)[:, None]
    for mean, std in [(0.9, 0.5), (-0.5, 0.1)]:
        one = d.TruncatedNormal(torch.tensor([[mean]]), torch.tensor([[std]]))
        log_p = one.log_prob(grid)
        assert torch.trapezoid(log_p.exp(), grid[:, 0]).item() == pytest.approx(1.0, abs=1e-4)
        assert one.entropy().item() == pytest.approx(-torch.trapezoid(log_p.exp() * log_p, grid[:, 0]).item(), abs=1e-3)


# Smoke runs of the real script -----------------------------------------------------------------------
TINY = ["--preset", "small", "--no-cuda", "--batch-size", "4", "--batch-length", "8", "--deter", "32", "--hidden", "32",
        "--stoch", "4", "--classes", "4", "--cnn-depth", "4", "--mlp-units", "32", "--mlp-layers", "1", "--horizon", "4",
        "--prefill", "40", "--pretrain", "2", "--train-every", "4", "--log-every", "40", "--video-every", "4",
        "--checkpoint-every", "5", "--eval-episodes", "1"]


def run(tmp_path, *extra, timeout=120):
    return run_script(SCRIPT, [*TINY, *extra], tmp_path, timeout)


@pytest.mark.parametrize("env_id, extra, total", [
    # a Pong game lasts thousands of steps: no evaluation episode here (the other runs evaluate)
    ("ALE/Pong-v5", ["--action-repeat", "4", "--grayscale", "--eval-episodes", "0"], 480),
    # continuous actions (dynamics backprop), under bf16 autocast (CPU autocast takes the same path as CUDA's)
    ("dm_control/cartpole-swingup-v0", ["--action-repeat", "8", "--bf16"], 800),
])
def test_smoke_run_writes_logs_video_checkpoint_and_resumes(tmp_path, env_id, extra, total):
    out = run(tmp_path, "--env-id", env_id, *extra, "--total-timesteps", str(total))
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path)
    assert os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
    acc = events(run_dir)
    scalars = acc.Tags()["scalars"]
    for tag in ("world_model/kl", "losses/actor_loss", "losses/critic_loss", "perf/train_step_ms", "charts/SPS"):
        assert tag in scalars, (tag, scalars)
    assert ("eval/episodic_return" in scalars) == ("0" not in extra)
    assert "media/openloop" in acc.Tags()["tensors"] + acc.Tags()["images"]
    ckpt = checkpoint(run_dir)
    assert ckpt["global_step"] == total and ckpt["updates"] > 2
    check_resume_doubles_the_run(SCRIPT, [*TINY, "--env-id", env_id, *extra], total, tmp_path, run_dir)


def test_kill_and_resume_loses_nothing(tmp_path):
    run_dir, _, _ = kill_and_resume(SCRIPT, [*TINY, "--env-id", "CartPole-v1"], tmp_path)
    # the training loop stores rows as common/replay.py documents: replaying the stored actions in a
    # fresh CartPole with the run's seed reproduces every stored observation, reward and flag
    from common.envs import make_env
    first_file = sorted(os.listdir(os.path.join(run_dir, "episodes")))[0]
    first_file = os.path.join(run_dir, "episodes", first_file)
    first = np.load(first_file)
    env = make_env("CartPole-v1", 0)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(first["obs"][0], obs)
    assert first["is_first"][0] and not first["is_first"][1:].any() and first["action"][0].sum() == 0
    for t in range(1, len(first["obs"])):
        obs, reward, terminated, truncated, _ = env.step(int(first["action"][t].argmax()))
        np.testing.assert_array_equal(first["obs"][t], obs)
        assert (first["reward"][t], first["terminated"][t], first["truncated"][t]) == (reward, terminated, truncated)
    assert terminated or truncated
    with open(os.path.join(run_dir, "args.json")) as f:
        assert json.load(f)["env_id"] == "CartPole-v1"


def test_bad_resume_and_bad_actor_grad_get_one_sentence(tmp_path, monkeypatch, capsys):
    for extra, words in ((["--env-id", "CartPole-v1", "--resume", str(tmp_path / "nope")], "Cannot resume"),
                         (["--env-id", "CartPole-v1", "--actor-grad", "dynamics"], "discrete"),
                         (["--env-id", "FrozenLake-v1"], "observation space")):
        code, told = stop_in_process(d, [*TINY, *extra], tmp_path, monkeypatch, capsys)
        assert code != 0 and words in told, told
