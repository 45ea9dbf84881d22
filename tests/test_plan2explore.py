"""Plan2Explore: the disagreement, the ensemble's inputs, targets and gradients, the intrinsic reward's alignment
in imagination, novelty on unseen inputs, and smoke runs through both phases plus kill-and-resume."""

import dataclasses

import numpy as np
import pytest
import torch
from gymnasium import spaces

from tests.helpers import (
    checkpoint, events, kill_and_resume, only_run_dir, run_script, script, stop_in_process, stored_rows,
)
import plan2explore as p2e  # noqa: E402, I001  (algos/ is on the path through tests.helpers)

SCRIPT = script("plan2explore.py")


def tiny_args(**kw):
    return dataclasses.replace(p2e.Args(), deter=8, stoch=4, hidden=8, units=8, cnn_depth=4, free_nats=0.0,
                               horizon=4, **kw)


def tiny_wm(args):
    torch.manual_seed(0)
    return p2e.WorldModel(spaces.Box(-1, 1, (5,), np.float32), 2, args)


def toy_batch(B=2, T=6):
    """Random vectors (5-dim), actions and rewards; every sequence starts an episode."""
    batch = dict(obs=torch.randn(B, T, 5), action=torch.rand(B, T, 2) * 2 - 1, reward=torch.randn(B, T),
                 is_first=torch.zeros(B, T, dtype=torch.bool), terminated=torch.zeros(B, T, dtype=torch.bool))
    batch["is_first"][:, 0] = True
    return batch


def test_disagreement_is_the_per_dimension_variance_of_the_ensemble_means_averaged():
    means = torch.tensor([[[1.0, 0.0, 2.0]], [[3.0, 0.0, 2.0]], [[2.0, 3.0, 2.0]]])  # K 3, N 1, d 3
    # dimension 0: mean 2, unbiased variance (1 + 1 + 0) / 2 = 1; dimension 1: mean 1, (1 + 1 + 4) / 2 = 3; dim 2: 0
    assert p2e.disagreement(means).tolist() == [pytest.approx((1 + 3 + 0) / 3)]


def test_ensemble_members_differ_and_see_the_action_at_every_layer():
    torch.manual_seed(0)
    ens = p2e.Ensemble(4, 6, 2, 5, 16)
    feat, action = torch.randn(3, 6), torch.randn(3, 2)
    out = ens(feat, action)
    assert out.shape == (4, 3, 5) and (p2e.disagreement(out) > 0).all()
    for k in range(4):  # member k equals its own three-layer MLP with the action concatenated at each layer
        x = feat
        for i, (w, b) in enumerate(zip(ens.weights, ens.biases)):
            x = torch.cat([x, action], -1) @ w[k] + b[k, 0]
            x = torch.relu(x) if i < 2 else x
        torch.testing.assert_close(out[k], x)


def test_ensemble_loss_pairs_s_t_and_a_t_with_the_next_embedding_and_sends_no_gradient_to_the_world_model():
    args = tiny_args()
    wm = tiny_wm(args)
    ens = p2e.Ensemble(3, wm.feat_dim, 2, wm.embed_dim, 8)
    B, T = 2, 6
    batch = toy_batch(B, T)
    batch["is_first"][0, 3] = True  # a reset inside sequence 0: the transition 2 → 3 must not be trained on
    _, post, embed, _ = p2e.world_model_loss(wm, batch, args)
    feat = p2e.feature(post)
    loss = p2e.ensemble_loss(ens, feat, embed, batch["action"], batch["is_first"])
    pred = ens(feat[:, :-1].flatten(0, 1), batch["action"][:, 1:].flatten(0, 1))
    err = 0.5 * (pred - embed[:, 1:].flatten(0, 1)).pow(2).sum(-1)  # (K, B·(T−1))
    keep = torch.ones(B, T - 1)
    keep[0, 2] = 0
    by_hand = (err * keep.flatten()).sum(1).mean() / keep.sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    shifted = ens(feat[:, :-1].flatten(0, 1), batch["action"][:, :-1].flatten(0, 1))  # a_{t−1} instead of a_t
    err_shifted = 0.5 * (shifted - embed[:, 1:].flatten(0, 1)).pow(2).sum(-1)
    assert loss.item() != pytest.approx(((err_shifted * keep.flatten()).sum(1).mean() / keep.sum()).item(), rel=1e-3)
    wm.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in wm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ens.parameters())


def test_the_intrinsic_reward_of_s_tau_is_the_disagreement_about_the_transition_into_it():
    args = tiny_args()
    wm = tiny_wm(args)
    actor = p2e.Actor(wm.feat_dim, 2, 8, 5.0, 5.0)
    ens = p2e.Ensemble(3, wm.feat_dim, 2, wm.embed_dim, 8)
    start = wm.rssm.initial(4, "cpu")
    start["stoch"] = torch.randn(4, args.stoch)
    feats, actions = p2e.imagine(wm, actor, start, args.horizon)
    assert feats.shape[0] == args.horizon + 1 and actions.shape[0] == args.horizon
    reward = p2e.intrinsic_reward(ens, feats, actions)
    for tau in range(1, args.horizon + 1):  # reward[τ−1] comes with s_τ: D(s_{τ−1}, a_{τ−1})
        torch.testing.assert_close(reward[tau - 1], p2e.disagreement(ens(feats[tau - 1], actions[tau - 1])))
    assert not torch.allclose(reward[1], p2e.disagreement(ens(feats[2], actions[1])))


def test_the_task_reward_of_s_tau_is_the_reward_head_at_s_tau():
    args = tiny_args()
    wm = tiny_wm(args)
    feats = torch.randn(args.horizon + 1, 3, wm.feat_dim)  # s_0 … s_H
    reward = p2e.task_reward(wm, feats, None)
    assert reward.shape == (args.horizon, 3)
    for tau in range(1, args.horizon + 1):
        torch.testing.assert_close(reward[tau - 1], wm.reward(feats[tau]).squeeze(-1))
    assert not torch.allclose(reward[0], wm.reward(feats[0]).squeeze(-1))


def test_the_reward_head_reads_the_posterior_of_its_own_row_and_never_shapes_the_representation():
    args = tiny_args()
    wm = tiny_wm(args)
    B, T = 2, 6
    batch = toy_batch(B, T)
    torch.manual_seed(1)
    _, post, _, metrics = p2e.world_model_loss(wm, batch, args)
    r_hat = wm.reward(p2e.feature(post)).squeeze(-1)
    by_hand = 0.5 * (r_hat - batch["reward"]).pow(2).mean()  # r_t, returned with o_t, against r̂(s_t)
    shifted = 0.5 * (r_hat[:, :-1] - batch["reward"][:, 1:]).pow(2).mean()
    assert metrics["reward_loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert metrics["reward_loss"].item() != pytest.approx(shifted.item(), rel=1e-3)
    wm.zero_grad()
    metrics["reward_loss"].backward()
    assert all(p.grad is None for n, p in wm.named_parameters() if not n.startswith("reward."))
    assert all(p.grad is not None for p in wm.reward.parameters())


def test_disagreement_is_higher_on_inputs_the_ensemble_was_not_trained_on():
    torch.manual_seed(0)
    ens = p2e.Ensemble(5, 4, 1, 3, 32)
    opt = torch.optim.Adam(ens.parameters(), 1e-2)
    target_fn = lambda x: torch.sin(x[:, :3] * 2)  # noqa: E731
    for _ in range(150):  # trained on the region around −1 only
        x = torch.randn(64, 4) * 0.3 - 1
        loss = 0.5 * (ens(x, torch.zeros(64, 1)) - target_fn(x)).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        seen = p2e.disagreement(ens(torch.randn(256, 4) * 0.3 - 1, torch.zeros(256, 1))).mean()
        unseen = p2e.disagreement(ens(torch.randn(256, 4) * 0.3 + 2, torch.zeros(256, 1))).mean()
    assert unseen > 10 * seen


def test_running_magnitude_makes_the_scale_irrelevant():
    a, b = p2e.RunningMagnitude(), p2e.RunningMagnitude()
    x = torch.rand(10, 3)
    torch.testing.assert_close(a(x), b(1000 * x))


# Smoke runs of the real script -----------------------------------------------------------------------
TINY = ["--preset", "small", "--no-cuda", "--batch-size", "4", "--batch-length", "8", "--deter", "16", "--hidden", "16",
        "--stoch", "4", "--units", "16", "--cnn-depth", "4", "--ensemble-size", "3", "--horizon", "4", "--prefill", "100",
        "--pretrain", "3", "--train-every", "250", "--train-steps", "3", "--task-updates", "4", "--video-every", "5",
        "--checkpoint-every", "4", "--eval-episodes", "1"]


def test_smoke_run_through_exploration_zero_shot_and_few_shot(tmp_path):
    args = [*TINY, "--env-id", "dm_control/cartpole-swingup-v0", "--action-repeat", "8", "--total-timesteps", "1000",
            "--adapt-steps", "1000", "--log-every", "500", "--bf16"]
    out = run_script(SCRIPT, args, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eval (zero-shot)" in out.stdout and "eval (few-shot)" in out.stdout
    assert "after 1000 env steps" in out.stdout and "after 2000 env steps" in out.stdout  # zero-shot took no step
    run_dir = only_run_dir(tmp_path)
    acc = events(run_dir)
    scalars = acc.Tags()["scalars"]
    for tag in ("world_model/kl", "world_model/image_loss", "losses/ensemble_loss", "losses/expl_imag_reward",
                "losses/task_actor_loss", "eval/zero_shot_return", "eval/few_shot_return", "charts/episodic_return"):
        assert tag in scalars, (tag, scalars)
    assert "media/openloop" in acc.Tags()["images"]
    c = checkpoint(run_dir)["counters"]
    assert c["global_step"] == 2000 and c["task_done"] == 4 and len(c["zero_shot"]) == len(c["few_shot"]) == 1
    rows, episodes = stored_rows(run_dir)
    assert rows == 2000 // 8 + episodes + 1  # every collected step and reset is stored; evaluation episodes are not


def test_kill_and_resume_loses_nothing(tmp_path):
    _, ckpt, episodes = kill_and_resume(SCRIPT, [*TINY, "--env-id", "Pendulum-v1", "--log-every", "100"], tmp_path)
    assert ckpt["counters"]["global_step"] == ckpt["global_step"] > 0 and episodes >= 1


def test_bad_inputs_get_one_sentence(tmp_path, monkeypatch, capsys):
    for extra, words in ((["--env-id", "CartPole-v1"], "discrete actions"),
                         (["--env-id", "Pendulum-v1", "--ensemble-size", "1"], "--ensemble-size"),
                         (["--env-id", "Pendulum-v1", "--resume", str(tmp_path / "nope")], "Cannot resume")):
        code, told = stop_in_process(p2e, [*TINY, *extra], tmp_path, monkeypatch, capsys)
        assert code != 0 and words in told, told
