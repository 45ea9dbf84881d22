"""Dreamer (v1): hand-computed tests of V_λ and the gradient paths, alignment tests, smoke runs of the real script."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces

from tests.helpers import (
    check_resume_doubles_the_run, checkpoint, events, kill_and_resume, only_run_dir, run_script, script,
    stop_in_process,
)
import dreamer_v1 as d  # noqa: E402  (tests.helpers puts algos/ on the path)

SCRIPT = script("dreamer_v1.py")


def tiny_args(**kw):
    base = dict(deter=16, hidden=16, stoch=4, units=16, cnn_depth=4, horizon=4, gamma=0.9, pred_discount=True, free_nats=0.0)
    return dataclasses.replace(d.Args(), **{**base, **kw})


# V_λ (Eq. 6) is tested in test_copied_parts.py against every copy -------------------------------------
def test_trajectory_weight_cuts_after_predicted_and_real_terminations():
    discount = torch.tensor([[0.9, 0.9], [0.5, 0.5], [0.0, 0.0], [0.9, 0.9]])
    weight = d.trajectory_weight(discount, torch.tensor([1.0, 0.0]))  # the second start is a real terminal state
    np.testing.assert_allclose(weight.numpy(), [[1.0, 0.0], [0.9, 0.0], [0.45, 0.0], [0.0, 0.0]])


# Gradient paths ----------------------------------------------------------------------------------------
def make_models(args, discrete=False, obs_dim=5, action_dim=2):
    torch.manual_seed(0)
    wm = d.WorldModel(spaces.Box(-1, 1, (obs_dim,), np.float32), action_dim, args)
    actor = d.Actor(wm.feat_dim, action_dim, discrete, args.units, args.action_init_std, args.action_mean_scale)
    value = d.mlp(wm.feat_dim, 1, 3, args.units)
    return wm, actor, value


def toy_batch(B=2, T=6, obs_dim=5, action_dim=2, discrete=False):
    torch.manual_seed(1)
    action = F.one_hot(torch.randint(0, action_dim, (B, T)), action_dim).float() if discrete else torch.rand(B, T, action_dim) * 2 - 1
    return dict(obs=torch.randn(B, T, obs_dim), action=action, reward=torch.randn(B, T),
                terminated=torch.zeros(B, T, dtype=torch.bool), is_first=torch.zeros(B, T, dtype=torch.bool))


def posteriors(wm, batch):
    return wm.rssm.observe(wm.embed(batch["obs"]), batch["action"], batch["is_first"])[0]


@pytest.mark.parametrize("discrete", [False, True])
def test_actor_gradient_flows_through_the_dynamics_and_never_into_the_world_model(discrete):
    args = tiny_args()
    wm, actor, value = make_models(args, discrete)
    batch = toy_batch(discrete=discrete)
    loss_actor, loss_value, _ = d.behaviour_loss(wm, actor, value, posteriors(wm, batch), batch["terminated"], args)
    loss_actor.backward(retain_graph=True)
    # the actor loss is −E[w V_λ] with no entropy term: its only path to the actor is through imagined states
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.net[0].parameters())
    assert all(p.grad is None for p in wm.parameters()) and all(p.requires_grad for p in wm.parameters())
    assert all(p.grad is None for p in value.parameters())
    # the value loss trains the value model only: targets and states are detached
    actor.zero_grad(set_to_none=True)
    loss_value.backward()
    assert all(p.grad is not None for p in value.parameters())
    assert all(p.grad is None for p in actor.parameters()) and all(p.grad is None for p in wm.parameters())


def test_value_targets_are_detached():
    value = torch.tensor([1.0, 2.0], requires_grad=True)
    returns = torch.tensor([3.0, 1.0], requires_grad=True)
    loss = d.value_loss(value, returns, torch.ones(2))
    g_value, g_returns = torch.autograd.grad(loss, [value, returns], allow_unused=True)
    np.testing.assert_allclose(g_value.numpy(), [-1.0, 0.5])  # ½ mean (v − V)²: (v − V) / 2
    assert g_returns is None


def test_tanh_normal_actor_starts_wide_and_stays_in_bounds():
    actor = d.Actor(3, 2, False, 8, init_std=5.0, mean_scale=5.0)
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.zero_()
    dist = actor(torch.zeros(1, 3))
    assert dist.normal.stddev[0, 0].item() == pytest.approx(5.0, rel=1e-3)  # softplus(0 + c) = init std
    torch.manual_seed(0)
    actions = actor(torch.zeros(1000, 3)).rsample()
    assert actions.abs().max() <= 1 and actions.abs().mean() > 0.5  # wide: most samples near the bounds


# World model alignment ------------------------------------------------------------------------------------
def test_world_model_targets_share_the_posterior_index():
    args = tiny_args()
    wm, *_ = make_models(args)
    batch = toy_batch(B=1, T=4)
    batch["terminated"][0, 2] = True
    torch.manual_seed(3)
    _, post, metrics = d.world_model_loss(wm, batch, args)
    feat = d.feature(post)
    target = torch.tensor([[0.9, 0.9, 0.0, 0.9]])  # γ (1 − terminated_t) at index t
    expected = F.binary_cross_entropy_with_logits(wm.discount(feat).squeeze(-1), target)
    assert metrics["discount_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    reward_nll = 0.5 * (wm.reward(feat).squeeze(-1) - batch["reward"]).pow(2).mean()
    assert metrics["reward_loss"].item() == pytest.approx(reward_nll.item(), rel=1e-6)
    shifted = 0.5 * (wm.reward(feat).squeeze(-1)[:, 1:] - batch["reward"][:, :-1]).pow(2).mean()
    assert metrics["reward_loss"].item() != pytest.approx(shifted.item(), rel=1e-3)


def test_free_nats_clip_the_mean_kl():
    args = tiny_args(free_nats=1e6)
    wm, *_ = make_models(args)
    loss, _, metrics = d.world_model_loss(wm, toy_batch(), args)
    loss.backward()
    assert metrics["kl"].item() < 1e6
    assert wm.rssm.img_out[-1].weight.grad.abs().sum() == 0  # under the threshold the prior gets no gradient


# Smoke runs of the real script -----------------------------------------------------------------------
TINY = ["--preset", "small", "--no-cuda", "--batch-size", "4", "--batch-length", "8", "--deter", "16", "--hidden", "16",
        "--stoch", "4", "--units", "16", "--cnn-depth", "4", "--horizon", "4", "--prefill", "100", "--pretrain", "2",
        "--train-every", "50", "--train-steps", "2", "--video-every", "2", "--checkpoint-every", "3", "--eval-episodes", "1"]


def run(tmp_path, *extra, timeout=120):
    return run_script(SCRIPT, [*TINY, *extra], tmp_path, timeout)


@pytest.mark.parametrize("env_id, extra, total", [
    ("dm_control/cartpole-swingup-v0", ["--action-repeat", "8", "--bf16", "--log-every", "400"], 1200),
    ("Pendulum-v1", ["--log-every", "100"], 400),
    ("CartPole-v1", ["--log-every", "100"], 400),  # discrete actions: one-hot actor
])
def test_smoke_run_writes_logs_checkpoint_and_resumes(tmp_path, env_id, extra, total):
    out = run(tmp_path, "--env-id", env_id, *extra, "--total-timesteps", str(total))
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path)
    acc = events(run_dir)
    scalars = acc.Tags()["scalars"]
    for tag in ("world_model/kl", "world_model/reward_loss", "losses/actor_loss", "losses/value_loss",
                "perf/train_step_ms", "charts/SPS", "eval/episodic_return"):
        assert tag in scalars, (tag, scalars)
    assert ("media/openloop" in acc.Tags()["images"]) == env_id.startswith("dm_control")
    ckpt = checkpoint(run_dir)
    assert ckpt["global_step"] == total and ckpt["updates"] > 2
    if env_id == "Pendulum-v1":
        check_resume_doubles_the_run(SCRIPT, [*TINY, "--env-id", env_id, *extra], total, tmp_path, run_dir)


def test_kill_and_resume_loses_nothing(tmp_path):
    kill_and_resume(SCRIPT, [*TINY, "--env-id", "CartPole-v1", "--log-every", "100"], tmp_path)


def test_bad_inputs_get_one_sentence(tmp_path, monkeypatch, capsys):
    for extra, words in ((["--env-id", "FrozenLake-v1"], "observation space"),
                         (["--env-id", "Pendulum-v1", "--resume", str(tmp_path / "nope")], "Cannot resume")):
        code, told = stop_in_process(d, [*TINY, *extra], tmp_path, monkeypatch, capsys)
        assert code != 0 and words in told, told
