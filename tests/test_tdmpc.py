"""TD-MPC: the planner, the window alignment, the TD target, the losses' weights and targets, PER, and smoke runs."""

import dataclasses

import numpy as np
import pytest
import torch
from gymnasium import spaces

from common.replay import Replay
from tests.helpers import (
    check_resume_doubles_the_run, checkpoint, events, kill_and_resume, only_run_dir, run_script, script,
    stop_in_process,
)
import tdmpc as td  # noqa: E402  (algos/ is on the path through tests.helpers)

SCRIPT = script("tdmpc.py")


def tiny(obs_dim=3, action_dim=2, **kw):
    args = dataclasses.replace(td.Args(), latent_dim=4, mlp_dim=8, enc_dim=8, horizon=3, **kw)
    torch.manual_seed(0)
    model = td.TOLD(spaces.Box(-1, 1, (obs_dim,), np.float32), action_dim, args)
    target = td.TOLD(spaces.Box(-1, 1, (obs_dim,), np.float32), action_dim, args)  # a different encoder on purpose
    return args, model, target


# MPPI ------------------------------------------------------------------------------------------------
def test_mppi_finds_the_optimum_of_a_toy_problem():
    optimum = torch.tensor([[0.3], [-0.5], [0.8]])  # H 3, 1-D actions
    torch.manual_seed(0)
    mean, std, elites, score = td.mppi(lambda a: -(a - optimum[:, None]).pow(2).sum((0, 2)), torch.zeros(3, 1),
                                       std_floor=0.05, num_samples=512, num_elites=64, iterations=6, temperature=0.5,
                                       momentum=0.1)
    torch.testing.assert_close(mean, optimum, atol=0.05, rtol=0)
    assert elites.shape == (3, 64, 1) and score.sum().item() == pytest.approx(1.0)
    assert (std >= 0.05).all()


def test_mppi_keeps_a_policy_trajectory_that_beats_every_sample():
    best = torch.full((2, 1, 1), 0.9)
    torch.manual_seed(0)
    _, _, elites, score = td.mppi(lambda a: -(a - 0.9).abs().sum((0, 2)), torch.zeros(2, 1), 0.05, 8, 2, 1, 0.5, 0.1,
                                  extra_actions=best, std_init=0.01)  # samples stay near 0: the extra one must win
    assert torch.equal(elites[:, score.argmax()], best[:, 0])


def test_warm_start_shifts_the_previous_solution_by_exactly_one_step():
    prev = torch.arange(5.0)[:, None].repeat(1, 2)  # μ_t = t
    warm = td.warm_start(prev, 5, 2, "cpu")
    torch.testing.assert_close(warm[:, 0], torch.tensor([1.0, 2, 3, 4, 0]))
    assert torch.equal(td.warm_start(None, 5, 2, "cpu"), torch.zeros(5, 2))  # first step of an episode
    torch.testing.assert_close(td.warm_start(prev[:2], 3, 2, "cpu")[:, 0], torch.tensor([1.0, 0, 0]))  # horizon grew


def test_trajectory_value_discounts_rewards_and_bootstraps_with_the_min_q_at_the_horizon():
    _, model, _ = tiny(action_dim=1)
    with torch.no_grad():
        model.reward[-1].bias.fill_(1.0)  # R ≡ 1
        model.q1[-1].bias.fill_(10.0)
        model.q2[-1].bias.fill_(4.0)  # min Q ≡ 4
    G = td.estimate_value(model, torch.zeros(7, 4), torch.zeros(3, 7, 1), 0.5, 0.05)
    torch.testing.assert_close(G, torch.full((7,), 1 + 0.5 + 0.25 + 0.125 * 4))


# Window alignment and masks ---------------------------------------------------------------------------
def test_window_batch_pairs_each_action_and_reward_with_the_observation_it_produced():
    t = np.arange(6)
    rows = dict(obs=t[None, :, None].astype(np.float32), action=10 * t[None, :, None].astype(np.float32),
                reward=100 * t[None].astype(np.float32), terminated=np.zeros((1, 6), bool),
                truncated=np.zeros((1, 6), bool), is_first=np.zeros((1, 6), bool))
    b = td.window_batch({k: v[:, 1:5] for k, v in rows.items()}, "cpu")  # window starting at row 1, H 3
    assert b["obs"].item() == 1
    assert b["next_obs"][:, 0, 0].tolist() == [2, 3, 4]  # s_{t+1}
    assert b["action"][:, 0, 0].tolist() == [20, 30, 40]  # a_t: taken at s_t, stored with s_{t+1}'s row
    assert b["reward"][:, 0].tolist() == [200, 300, 400]  # r_t: earned by a_t


def test_valid_windows_and_alive_mask_by_hand():
    F_, T_ = False, True
    # rows i+1 … i+3: a reset inside the window is allowed only after a terminal row
    is_first = np.array([[F_, F_, F_], [F_, T_, F_], [F_, F_, T_], [T_, F_, F_]])
    terminated = np.array([[F_, F_, F_], [F_, F_, F_], [F_, T_, F_], [F_, F_, F_]])
    assert td.valid_windows(is_first, terminated).tolist() == [True, False, True, False]
    alive = td.alive_mask(torch.tensor(terminated))
    assert alive.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]  # row i+2 terminal: step 1 into it kept


def test_td_target_takes_the_min_of_the_target_qs_and_masks_terminations_only():
    _, model, target = tiny()
    with torch.no_grad():
        target.q1[-1].bias.fill_(3.0)
        target.q2[-1].bias.fill_(5.0)
        model.q1[-1].bias.fill_(-7.0)  # the online Qs must not be used
    y = td.td_target(model, target, torch.randn(3, 3), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 0.0]),
                     0.9, 0.05)
    torch.testing.assert_close(y, torch.tensor([1 + 0.9 * 3, 2.0, 3 + 0.9 * 3]))


def test_a_time_limit_still_bootstraps_and_a_termination_does_not():
    _, model, target = tiny(action_dim=1)
    with torch.no_grad():
        target.q1[-1].bias.fill_(3.0)
        target.q2[-1].bias.fill_(3.0)
    rows = dict(obs=np.zeros((2, 4, 3), np.float32), action=np.zeros((2, 4, 1), np.float32),
                reward=np.zeros((2, 4), np.float32), terminated=np.zeros((2, 4), bool), truncated=np.zeros((2, 4), bool),
                is_first=np.zeros((2, 4), bool))
    rows["truncated"][0, 3] = True  # window 0 ends at a time limit
    rows["terminated"][1, 3] = True  # window 1 ends at a terminal state
    b = td.window_batch(rows, "cpu")
    y = td.td_target(model, target, b["next_obs"][2], b["reward"][2], b["terminated"][2], 0.99, 0.05)
    torch.testing.assert_close(y, torch.tensor([0.99 * 3, 0.0]))


# The TOLD loss ---------------------------------------------------------------------------------------
def window(B=5, H=3, obs_dim=3, action_dim=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(obs=torch.randn(B, obs_dim, generator=g), next_obs=torch.randn(H, B, obs_dim, generator=g),
                action=torch.rand(H, B, action_dim, generator=g) * 2 - 1, reward=torch.randn(H, B, generator=g),
                terminated=torch.zeros(H, B), alive=torch.ones(H + 1, B))


def rollout(model, batch):
    z, zs = model.h(batch["obs"]), []
    for t in range(batch["action"].shape[0]):
        zs.append(z)
        z = model.dynamics(torch.cat([z, batch["action"][t]], -1))
    return zs + [z]


def test_consistency_targets_the_target_encoder_of_the_next_observation_weighted_by_rho_t():
    args, model, target = tiny()
    batch = window()
    _, _, zs, metrics = td.told_loss(model, target, batch, torch.ones(5), args)
    with torch.no_grad():
        z = rollout(model, batch)
        rho = [args.rho**t for t in range(3)]
        by_hand = sum(rho[t] * (z[t + 1] - target.h(batch["next_obs"][t])).pow(2).mean(-1) for t in range(3)).mean()
        shifted = sum(rho[t] * (z[t + 1] - target.h(batch["next_obs"][t - 1] if t else batch["obs"])).pow(2).mean(-1)
                      for t in range(3)).mean()
        online = sum(rho[t] * (z[t + 1] - model.h(batch["next_obs"][t])).pow(2).mean(-1) for t in range(3)).mean()
    assert metrics["consistency_loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert metrics["consistency_loss"].item() != pytest.approx(shifted.item(), rel=1e-3)
    assert metrics["consistency_loss"].item() != pytest.approx(online.item(), rel=1e-3)
    torch.testing.assert_close(zs, torch.stack(z))


def test_reward_and_value_losses_pair_step_t_with_r_t_and_y_t():
    args, model, target = tiny()
    with torch.no_grad():
        for net in (model.reward, model.q1, model.q2):
            net[-1].weight.normal_()  # non-trivial heads (they start at zero)
    batch = window()
    torch.manual_seed(5)
    _, priority, _, metrics = td.told_loss(model, target, batch, torch.ones(5), args)
    torch.manual_seed(5)  # the same policy noise inside the TD target
    with torch.no_grad():
        z = rollout(model, batch)
        y = td.td_target(model, target, batch["next_obs"].flatten(0, 1), batch["reward"].flatten(),
                         batch["terminated"].flatten(), args.discount, args.min_std).view(3, 5)
        rho = [args.rho**t for t in range(3)]
        r_hat = [model.next(z[t], batch["action"][t])[1].squeeze(-1) for t in range(3)]
        q = [[qi.squeeze(-1) for qi in model.Q(z[t], batch["action"][t])] for t in range(3)]
    reward_loss = sum(rho[t] * (r_hat[t] - batch["reward"][t]).pow(2) for t in range(3)).mean()
    reward_shifted = sum(rho[t] * (r_hat[t] - batch["reward"][t - 1]).pow(2) for t in range(1, 3)).mean()
    value_loss = sum(rho[t] * ((q[t][0] - y[t]).pow(2) + (q[t][1] - y[t]).pow(2)) for t in range(3)).mean()
    by_hand_priority = sum(rho[t] * ((q[t][0] - y[t]).abs() + (q[t][1] - y[t]).abs()) for t in range(3))
    assert metrics["reward_loss"].item() == pytest.approx(reward_loss.item(), rel=1e-5)
    assert metrics["reward_loss"].item() != pytest.approx(reward_shifted.item(), rel=1e-3)
    assert metrics["value_loss"].item() == pytest.approx(value_loss.item(), rel=1e-5)
    torch.testing.assert_close(priority, by_hand_priority)


def test_steps_after_a_terminal_row_are_masked_out_of_the_loss():
    args, model, target = tiny()
    batch = window()
    batch["terminated"][0, 2] = 1.0  # sample 2 reaches a terminal state at its first step
    batch["alive"] = td.alive_mask(batch["terminated"].T).T
    _, _, _, before = td.told_loss(model, target, batch, torch.ones(5), args)
    batch["next_obs"][1:, 2] += 100.0  # garbage after the terminal row (the next episode) must not count
    batch["reward"][1:, 2] += 100.0
    _, _, _, after = td.told_loss(model, target, batch, torch.ones(5), args)
    for k in ("consistency_loss", "reward_loss"):
        assert after[k].item() == pytest.approx(before[k].item(), rel=1e-6)


def test_the_policy_step_moves_only_the_policy_and_raises_its_q():
    args, model, target = tiny()
    batch = window()
    with torch.no_grad():
        model.q1[-1].weight.normal_()
        model.q2[-1].weight.normal_()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the TOLD step changes nothing: isolate the policy step
    pi_opt = torch.optim.SGD(model.pi.parameters(), lr=1e-2)
    zs = torch.stack(rollout(model, batch)).detach()
    torch.manual_seed(0)
    loss_before = td.policy_loss(model, zs, batch["alive"], args).item()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target_before = {k: v.clone() for k, v in target.state_dict().items()}
    td.update(model, target, opt, pi_opt, batch, torch.ones(5), dataclasses.replace(args, update_freq=2), 1, lambda: "")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("pi."))  # nothing else moves
    assert not torch.equal(after["pi.0.weight"], before["pi.0.weight"])
    assert all(p.requires_grad for p in model.parameters())  # Q unfrozen again
    assert all(torch.equal(target.state_dict()[k], target_before[k]) for k in target_before)  # odd update: no Polyak
    torch.manual_seed(0)
    assert td.policy_loss(model, zs, batch["alive"], args).item() < loss_before  # min Q went up


def test_target_network_moves_by_tau_every_update_freq_updates():
    args, model, target = tiny()
    target.load_state_dict(model.state_dict())
    target.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    pi_opt = torch.optim.Adam(model.pi.parameters(), 1e-2)
    old_target = {k: v.clone() for k, v in target.state_dict().items()}
    td.update(model, target, opt, pi_opt, window(), torch.ones(5), args, 2, lambda: "")  # 2 % 2 == 0: Polyak
    for k, v in model.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], old_target[k] + args.tau * (v - old_target[k]))


# Prioritized replay -----------------------------------------------------------------------------------
def filled_replay(terminal_at=None, truncate_at=None, n=8, H=2, capacity=100):
    replay = Replay(capacity, None, seed=0)
    windows = td.PrioritizedWindows(replay, H, 0.6, 0.4)
    for i in range(n):
        first = i == 0 or (i - 1) in (terminal_at, truncate_at)
        windows.add(obs=np.array([i], np.float32), action=np.zeros(1, np.float32), reward=0.0,
                    terminated=i == terminal_at, truncated=i == truncate_at, is_first=first)
    return replay, windows


def test_only_complete_windows_inside_an_episode_get_a_priority():
    # rows 0-3 episode A ending in a time limit at row 3, rows 4-7 episode B; H 2
    _, windows = filled_replay(truncate_at=3)
    assert (windows.priority[:8] > 0).tolist() == [True, True, False, False, True, True, False, False]
    # the same with a terminal row 3: windows may run past it (their later steps are masked)
    _, windows = filled_replay(terminal_at=3)
    assert (windows.priority[:8] > 0).tolist() == [True, True, True, False, True, True, False, False]
    _, windows = filled_replay(terminal_at=3)
    expected = windows.priority.copy()
    windows.reset_from_replay()
    np.testing.assert_array_equal(windows.priority > 0, expected > 0)


def test_per_probabilities_and_weights_follow_the_formula_on_a_hand_made_priority_vector():
    _, windows = filled_replay(n=6, H=1)
    p = np.array([1.0, 2.0, 0.0, 4.0, 0.5, 0.0])
    windows.priority[:6] = p
    P = p**0.6 / (p**0.6).sum()
    np.testing.assert_allclose(windows.probabilities(), P)
    rows, idx, weights = windows.sample(3)
    assert len(set(idx.tolist())) == 3 and not set(idx.tolist()) & {2, 5}  # distinct, never a zero priority
    w = (6 * P[idx]) ** -0.4
    np.testing.assert_allclose(weights, w / w.max(), rtol=1e-6)
    np.testing.assert_array_equal(rows["obs"][:, 0, 0], idx)  # each window starts at its drawn row
    windows.update(idx, np.array([7.0, 8.0, 9.0]))
    np.testing.assert_allclose(windows.priority[idx], [7 + 1e-6, 8 + 1e-6, 9 + 1e-6])


# Smoke runs of the real script -----------------------------------------------------------------------
TINY = ["--preset", "small", "--no-cuda", "--latent-dim", "8", "--mlp-dim", "32", "--enc-dim", "16", "--batch-size",
        "16", "--num-samples", "16", "--num-elites", "4", "--iterations", "2", "--seed-steps", "40",
        "--schedule-steps", "100", "--checkpoint-every", "20", "--eval-episodes", "1"]


@pytest.mark.parametrize("env_id, extra, total", [
    ("dm_control/cartpole-swingup-v0", ["--bf16", "--log-every", "400"], 1600),  # 2 episodes at action repeat 8
    ("Pendulum-v1", ["--log-every", "100"], 400),  # 2 episodes
])
def test_smoke_run_writes_logs_checkpoint_and_resumes(tmp_path, env_id, extra, total):
    out = run_script(SCRIPT, [*TINY, "--env-id", env_id, *extra, "--total-timesteps", str(total)], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("action repeat 8" in out.stdout) == env_id.startswith("dm_control/cartpole")  # the official table
    run_dir = only_run_dir(tmp_path)
    scalars = events(run_dir).Tags()["scalars"]
    for tag in ("losses/consistency_loss", "losses/reward_loss", "losses/value_loss", "losses/pi_loss",
                "perf/train_step_ms", "perf/plan_ms", "charts/SPS", "charts/episodic_return", "eval/episodic_return"):
        assert tag in scalars, (tag, scalars)
    ckpt = checkpoint(run_dir)
    repeat = 8 if env_id.startswith("dm_control/cartpole") else 1
    assert ckpt["global_step"] == total and ckpt["updates"] == total // repeat  # one update per agent step
    assert len(ckpt["priority"]) == ckpt["replay_size"] and (ckpt["priority"] != 1.0).any()  # updated priorities
    check_resume_doubles_the_run(SCRIPT, [*TINY, "--env-id", env_id, *extra], total, tmp_path, run_dir)


def test_kill_and_resume_loses_nothing_and_keeps_the_priorities(tmp_path):
    run_dir, ckpt, episodes = kill_and_resume(SCRIPT, [*TINY, "--env-id", "Pendulum-v1", "--log-every", "100"], tmp_path)
    assert episodes == ckpt["episodes"]
    out = run_script(SCRIPT, [*TINY, "--env-id", "Pendulum-v1", "--resume", run_dir, "--total-timesteps",
                              str(checkpoint(run_dir)["global_step"]), "--eval-episodes", "0"], tmp_path)
    assert out.returncode == 0 and "priorities reset" not in out.stdout, out.stdout + out.stderr


def test_pixels_run_the_conv_encoder_on_stacked_frames(tmp_path):
    out = run_script(SCRIPT, [*TINY, "--env-id", "dm_control/cartpole-swingup-v0", "--pixels", "--bf16",
                              "--total-timesteps", "480", "--log-every", "240", "--num-channels", "4"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "obs (9, 64, 64)" in out.stdout
    assert checkpoint(only_run_dir(tmp_path))["updates"] == 60  # the burst of 40 at step 40, then one per step


def test_random_shift_moves_whole_images_by_at_most_pad_pixels():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    torch.manual_seed(0)
    y = td.random_shift(x, 2)
    assert y.shape == x.shape
    for n in range(2):  # each output is a crop of the replicate-padded input
        padded = torch.nn.functional.pad(x[n:n + 1], (2, 2, 2, 2), mode="replicate")[0, 0]
        assert any(torch.equal(y[n, 0], padded[i:i + 8, j:j + 8]) for i in range(5) for j in range(5))


def test_bad_inputs_get_one_sentence(tmp_path, monkeypatch, capsys):
    for extra, words in ((["--env-id", "CartPole-v1"], "discrete actions"),
                         (["--env-id", "Pendulum-v1", "--pixels"], "--pixels is for dm_control"),
                         (["--env-id", "Pendulum-v1", "--num-elites", "50"], "--num-elites"),
                         (["--env-id", "Pendulum-v1", "--resume", str(tmp_path / "nope")], "Cannot resume")):
        code, told = stop_in_process(td, [*TINY, *extra], tmp_path, monkeypatch, capsys)
        assert code != 0 and words in told, told
