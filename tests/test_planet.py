"""PlaNet: hand-computed tests of the planner, the losses and their alignment, and smoke runs of the real script."""

import dataclasses

import numpy as np
import pytest
import torch
from gymnasium import spaces

from tests.helpers import (
    check_resume_doubles_the_run, checkpoint, events, kill_and_resume, only_run_dir, run_script, script,
    stop_in_process,
)
import planet as p  # noqa: E402  (tests.helpers puts algos/ on the path)

SCRIPT = script("planet.py")


def tiny_args(**kw):
    base = dict(deter=16, hidden=16, stoch=4, cnn_depth=4, free_nats=0.0)
    return dataclasses.replace(p.Args(), **{**base, **kw})


def make_wm(args, obs_dim=5, action_dim=2):
    torch.manual_seed(0)
    return p.WorldModel(spaces.Box(-1, 1, (obs_dim,), np.float32), action_dim, args)


def toy_batch(B=2, T=6, obs_dim=5, action_dim=2):
    torch.manual_seed(1)
    return dict(obs=torch.randn(B, T, obs_dim), action=torch.rand(B, T, action_dim) * 2 - 1, reward=torch.randn(B, T),
                terminated=torch.zeros(B, T, dtype=torch.bool), is_first=torch.zeros(B, T, dtype=torch.bool))


# CEM planner ---------------------------------------------------------------------------------------
class LinearLatentModel:
    """A toy latent model: h_{t+1} = h_t + a_t, no stochastic part."""

    def img_step(self, state, action):
        return dict(deter=state["deter"] + action, stoch=state["stoch"])


def test_cem_finds_the_optimum_of_a_quadratic_reward_in_a_linear_latent_model():
    goal = torch.tensor([0.5, -0.3])
    # r̂(s_{τ+1}) = −‖h_{τ+1} − goal‖²: the best plan jumps to the goal with its first action and stays
    reward = lambda feat: -(feat - goal).pow(2).sum(-1, keepdim=True)  # noqa: E731
    start = dict(deter=torch.zeros(1, 2), stoch=torch.zeros(1, 0))
    gen = torch.Generator().manual_seed(0)
    action = p.cem_plan(LinearLatentModel(), reward, start, 2, horizon=5, candidates=1000, top=100, iters=10, generator=gen)
    np.testing.assert_allclose(action.numpy(), goal.numpy(), atol=0.03)
    # from a start beyond the action bound the first action saturates at the bound
    far = dict(deter=torch.tensor([[3.0, 0.0]]), stoch=torch.zeros(1, 0))
    action = p.cem_plan(LinearLatentModel(), reward, far, 2, horizon=5, candidates=1000, top=100, iters=10, generator=gen)
    assert action[0].item() < -0.95 and abs(action[1].item() + 0.3) < 0.05


def test_cem_credits_each_reward_to_the_action_that_led_to_its_state():
    # only the state after the first action is rewarded: r̂(s_1) = a_0; later actions do not matter
    calls = []

    def reward(feat):  # feat (H, J, F): index 0 is s_1, the state a_0 led to
        calls.append(feat.shape[0])
        out = torch.zeros(feat.shape[:-1] + (1,))
        out[0] = feat[0, :, :1]
        return out

    start = dict(deter=torch.zeros(1, 1), stoch=torch.zeros(1, 0))
    gen = torch.Generator().manual_seed(1)
    action = p.cem_plan(LinearLatentModel(), reward, start, 1, horizon=4, candidates=500, top=50, iters=6, generator=gen)
    assert action.item() > 0.95 and calls == [4] * 6


# Losses ----------------------------------------------------------------------------------------------
def test_free_nats_clamp_each_time_step_before_the_mean():
    kl = torch.tensor([1.0, 5.0, 2.0, 4.0], requires_grad=True)
    loss = p.free_nats_kl(kl, 3.0)
    assert loss.item() == pytest.approx((3 + 5 + 3 + 4) / 4)  # the mean of the clamped steps, not max(mean, 3)
    (grad,) = torch.autograd.grad(loss, kl)
    np.testing.assert_allclose(grad.numpy(), [0.0, 0.25, 0.0, 0.25])  # steps under 3 nats get no gradient


def test_prior_gets_no_gradient_when_every_step_is_under_the_free_nats():
    batch = toy_batch()
    for free, expect_grad in [(1e6, False), (0.0, True)]:
        wm = make_wm(tiny_args(free_nats=free))
        loss, _, _ = p.world_model_loss(wm, batch, tiny_args(free_nats=free))
        loss.backward()
        grad = wm.rssm.img_out[-1].weight.grad  # the prior's output layer is trained by the KL alone
        assert (grad is not None and grad.abs().sum() > 0) == expect_grad


def test_latent_overshooting_starts_from_the_posterior():
    args = tiny_args()
    wm = make_wm(args)
    batch = toy_batch(T=7)
    batch["is_first"][:, 0] = True
    batch["is_first"][0, 4] = True  # a reset inside the first sequence
    embed = wm.embed(wm.preprocess(batch["obs"]))
    torch.manual_seed(2)
    post, prior = wm.rssm.observe(embed, batch["action"], batch["is_first"])
    kl = p.kl_gaussian(post["mean"], post["std"], prior["mean"], prior["std"])
    # d = 1 from the posterior s_{t-1} is exactly observe's one-step prior of s_t; pairs across a reset are skipped
    over = p.latent_overshooting_kl(wm.rssm, post, batch["action"], batch["is_first"], distance=1, free=0.0)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[:, 0] = False
    valid[0, 4] = False
    assert over.item() == pytest.approx(kl[valid].mean().item(), rel=1e-5)
    # world_model_loss hands it the posteriors
    wm_args = dataclasses.replace(args, overshooting_distance=1, overshooting_kl_scale=1.0)
    torch.manual_seed(2)
    _, _, metrics = p.world_model_loss(wm, batch, wm_args)
    assert metrics["overshooting_kl"].item() == pytest.approx(over.item(), rel=1e-5)
    # starting from the prior states instead would give a different value
    from_prior = p.latent_overshooting_kl(wm.rssm, prior, batch["action"], batch["is_first"], distance=1, free=0.0)
    assert from_prior.item() != pytest.approx(over.item(), rel=1e-3)
    # longer distances add the multi-step terms, and only the prior side receives their gradient
    post = {k: v.detach().requires_grad_(k in ("mean", "std")) for k, v in post.items()}
    over3 = p.latent_overshooting_kl(wm.rssm, post, batch["action"], batch["is_first"], distance=3, free=0.0)
    over3.backward()
    assert post["mean"].grad is None and wm.rssm.img_out[-1].weight.grad.abs().sum() > 0


def test_five_bit_quantisation_round_trip():
    frames = torch.arange(256, dtype=torch.uint8)
    torch.manual_seed(0)
    x = p.quantise(frames, 5)
    assert x.min() >= -0.5 and x.max() < 0.5
    # every 8-bit value lands in its 5-bit bin: 8 input values per bin, noise never crosses into the next bin
    bin_index = torch.floor((x + 0.5) * 32)
    np.testing.assert_array_equal(bin_index.numpy(), frames.numpy() >> 3)
    assert len(torch.unique(bin_index)) == 32


def test_reward_at_t_is_predicted_from_the_state_that_saw_the_action_that_earned_it():
    args = tiny_args()
    wm = make_wm(args)
    batch = toy_batch(B=1, T=5)
    torch.manual_seed(3)
    _, post, metrics = p.world_model_loss(wm, batch, args)
    feat = p.feature(post)
    reward_nll = 0.5 * (wm.reward(feat).squeeze(-1) - batch["reward"]).pow(2).mean()
    assert metrics["reward_loss"].item() == pytest.approx(reward_nll.item(), rel=1e-6)
    shifted = 0.5 * (wm.reward(feat).squeeze(-1)[:, 1:] - batch["reward"][:, :-1]).pow(2).mean()
    assert metrics["reward_loss"].item() != pytest.approx(shifted.item(), rel=1e-3)
    # the state at index 2 has seen action[2] (the action whose step returned o_2 and r_2), not action[3]
    changed = {k: v.clone() for k, v in batch.items()}
    changed["action"][0, 2] += 1.0
    torch.manual_seed(3)
    _, post2, _ = p.world_model_loss(wm, changed, args)
    assert torch.equal(post["deter"][0, :2], post2["deter"][0, :2])
    assert not torch.allclose(post["deter"][0, 2], post2["deter"][0, 2])


# Smoke runs of the real script -----------------------------------------------------------------------
TINY = ["--preset", "small", "--no-cuda", "--batch-size", "4", "--batch-length", "8", "--deter", "16", "--hidden", "16",
        "--stoch", "4", "--cnn-depth", "4", "--candidates", "20", "--top-candidates", "4", "--optimisation-iters", "2",
        "--planning-horizon", "3", "--seed-episodes", "1", "--collect-interval", "3", "--video-every", "2",
        "--checkpoint-every", "2", "--eval-episodes", "1"]


def run(tmp_path, *extra, timeout=120):
    return run_script(SCRIPT, [*TINY, *extra], tmp_path, timeout)


@pytest.mark.parametrize("env_id, extra, total", [
    ("dm_control/cartpole-swingup-v0", ["--bf16", "--log-every", "1000"], 2000),  # 2 episodes
    ("Pendulum-v1", ["--log-every", "200"], 600),  # 3 episodes
])
def test_smoke_run_writes_logs_video_checkpoint_and_resumes(tmp_path, env_id, extra, total):
    out = run(tmp_path, "--env-id", env_id, *extra, "--total-timesteps", str(total))
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("action repeat 8" in out.stdout) == env_id.startswith("dm_control/cartpole")  # PlaNet's table
    run_dir = only_run_dir(tmp_path)
    acc = events(run_dir)
    scalars = acc.Tags()["scalars"]
    for tag in ("world_model/kl", "world_model/image_loss", "world_model/reward_loss", "perf/train_step_ms",
                "perf/plan_ms", "charts/SPS", "charts/episodic_return", "eval/episodic_return"):
        assert tag in scalars, (tag, scalars)
    assert ("media/openloop" in acc.Tags()["images"]) == env_id.startswith("dm_control")
    ckpt = checkpoint(run_dir)
    assert ckpt["global_step"] == total and ckpt["updates"] == 3 * (ckpt["episodes"] - 1)
    check_resume_doubles_the_run(SCRIPT, [*TINY, "--env-id", env_id, *extra], total, tmp_path, run_dir)


def test_kill_and_resume_loses_nothing(tmp_path):
    _, ckpt, episodes = kill_and_resume(SCRIPT, [*TINY, "--env-id", "Pendulum-v1", "--log-every", "200"], tmp_path)
    assert episodes == ckpt["episodes"] >= 1  # the checkpoint counts exactly the episodes on disk


def test_bad_inputs_get_one_sentence(tmp_path, monkeypatch, capsys):
    for extra, words in ((["--env-id", "CartPole-v1"], "discrete actions"),
                         (["--env-id", "Pendulum-v1", "--top-candidates", "50"], "--top-candidates"),
                         (["--env-id", "Pendulum-v1", "--resume", str(tmp_path / "nope")], "Cannot resume")):
        code, told = stop_in_process(p, [*TINY, *extra], tmp_path, monkeypatch, capsys)
        assert code != 0 and words in told, told
