"""World Models: V's loss and size, M's mixture density, sampling and data alignment, C's size and actions,
the dream rollout, and the four-stage pipeline run end to end, stopped and resumed."""

import glob
import os

import numpy as np
import pytest
import torch

from tests.helpers import (
    SCRIPT_ENV, checkpoint, events, only_run_dir, run_script, script, start_and_terminate, stop_in_process,
)
import world_models_carracing as wm  # noqa: E402  (algos/ is on the path through tests.helpers)

SCRIPT = script("world_models_carracing.py")


# V ---------------------------------------------------------------------------------------------------
def test_vae_has_the_papers_parameter_count_and_shapes():
    vae = wm.VAE(32)
    assert sum(p.numel() for p in vae.parameters()) == 4_348_547
    recon, mu, logvar = vae(torch.rand(2, 3, 64, 64))
    assert recon.shape == (2, 3, 64, 64) and mu.shape == logvar.shape == (2, 32)
    assert 0 <= recon.min() and recon.max() <= 1


def test_decoder_first_layer_as_a_matmul_equals_the_transposed_conv():
    torch.manual_seed(0)
    vae = wm.VAE(8)
    z = torch.randn(3, 8)
    as_conv = vae.decoder(vae.dec_in(z).view(-1, 1024, 1, 1))
    torch.testing.assert_close(vae.decode(z), as_conv, rtol=1e-4, atol=1e-5)


def test_a_single_frame_encodes_as_it_does_inside_a_batch():
    # encode keeps one frame in its own memory format and converts batches to channels-last: same function
    vae = wm.VAE(32)
    frames = torch.rand(5, 3, 64, 64)
    seen = []

    def record_layout(module, inputs):
        seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last))

    vae.encoder[0].register_forward_pre_hook(record_layout)
    with torch.no_grad():
        vae.encode(frames[:1]), vae.encode(frames[:2])
        assert seen == [False, True]  # the speed measure is in place: one frame as is, a batch channels-last
        mu, logvar = vae.encode(frames)
        for i in range(5):
            one_mu, one_logvar = vae.encode(frames[i:i + 1])
            torch.testing.assert_close(one_mu, mu[i:i + 1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(one_logvar, logvar[i:i + 1], rtol=1e-4, atol=1e-5)


def test_kl_term_is_the_closed_form_floored_per_frame_at_the_tolerance():
    mu = torch.tensor([[0.1, -0.2, 0.0, 0.3], [3.0, -2.0, 1.5, 2.5]])  # a small-KL frame and a large-KL frame
    logvar = torch.tensor([[0.0, -0.1, 0.1, 0.0], [-1.0, 0.5, -2.0, 0.3]])
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (logvar / 2).exp()),
                                               torch.distributions.Normal(0.0, 1.0)).sum(-1)
    assert closed[0] < 0.5 * 4 < closed[1]
    x, recon = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    loss, r_loss, kl = wm.vae_loss(recon, x, mu, logvar, kl_tolerance=0.5)
    assert r_loss.item() == pytest.approx((x - recon).pow(2).sum((1, 2, 3)).mean().item(), rel=1e-6)
    assert kl.item() == pytest.approx(closed.mean().item(), rel=1e-5)  # logged: the KL itself
    floored = (0.5 * 4 + closed[1]) / 2  # the first frame's KL counts as the tolerance, 2 nats
    # loss - r_loss would lose digits to the ~2,000-nat reconstruction term in fp32: a perfect reconstruction
    # leaves the KL term alone in the loss
    kl_only, zero, _ = wm.vae_loss(x, x, mu, logvar, kl_tolerance=0.5)
    assert zero.item() == 0 and kl_only.item() == pytest.approx(floored.item(), rel=1e-6)
    assert (loss - r_loss).item() == pytest.approx(floored.item(), abs=1e-3)
    mu.requires_grad_(True)
    loss, _, _ = wm.vae_loss(recon, x, mu, logvar, 0.5)
    loss.backward()
    assert mu.grad[0].abs().sum() == 0 and mu.grad[1].abs().sum() > 0  # no KL gradient below the floor


# M ---------------------------------------------------------------------------------------------------
def test_mdn_nll_equals_the_mixture_density_computed_by_hand():
    logits = np.array([[[0.2, -1.0, 0.5], [1.0, 0.0, -0.5]]])  # (1 sample, 2 latent dims, 3 components)
    mean = np.array([[[0.0, 1.0, -1.0], [0.5, 0.2, 2.0]]])
    logstd = np.array([[[0.0, -0.5, 0.3], [0.1, 0.2, -0.3]]])
    y = np.array([[0.4, 1.1]])
    pi = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    sigma = np.exp(logstd)
    density = (pi * np.exp(-0.5 * ((y[..., None] - mean) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))).sum(-1)
    expected = -np.log(density).mean()  # one mixture per dimension, averaged
    t = lambda a: torch.tensor(a, dtype=torch.float32).transpose(-1, -2)  # noqa: E731  (the script's (K, z) layout)
    got = wm.mdn_nll(torch.log_softmax(t(logits), -2), t(mean), t(logstd), torch.tensor(y, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_mdn_head_gives_each_latent_dimension_its_own_normalised_mixture():
    rnn = wm.MDNRNN(2, 3, 8, 4)
    # the paper's count, plus PyTorch's second LSTM bias vector (TensorFlow keeps one), plus the zero input's weights
    assert sum(p.numel() for p in wm.MDNRNN(32, 3, 256, 5).parameters()) == 422_368 + 4 * 256 + 4 * 256
    with torch.no_grad():
        rnn.mdn.weight.zero_()
        rnn.mdn.bias.copy_(torch.arange(2 * 4 * 3, dtype=torch.float32))
    logmix, mean, logstd, reward, done = rnn.head(torch.zeros(1, 1, 8))
    assert logmix.shape == mean.shape == logstd.shape == (1, 1, 4, 2)  # (K, z)
    torch.testing.assert_close(logmix.exp().sum(-2), torch.ones(1, 1, 2))  # π sums to 1 per dimension
    assert mean[0, 0, :, 0].tolist() == [8, 10, 12, 14] and logstd[0, 0, :, 1].tolist() == [17, 19, 21, 23]
    assert reward is None and done is None


def test_sampling_at_temperature_near_zero_returns_the_most_likely_components_mean():
    logmix = torch.log_softmax(torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 2.9]]]), -1).transpose(1, 2)  # (1, K, z)
    mean = torch.tensor([[[5.0, -3.0, 1.0], [0.7, 9.0, -9.0]]]).transpose(1, 2)
    logstd = torch.zeros(1, 3, 2)
    torch.manual_seed(0)
    for _ in range(20):
        torch.testing.assert_close(wm.mdn_sample(logmix, mean, logstd, 1e-8), torch.tensor([[-3.0, 0.7]]), atol=1e-3, rtol=0)
    # at τ = 1 the other components are drawn too
    draws = torch.stack([wm.mdn_sample(logmix, mean, torch.full((1, 3, 2), -9.0), 1.0) for _ in range(200)])
    assert len(torch.unique(draws[:, 0, 0].round())) == 3


def test_mdn_batch_pairs_z_t_with_the_action_taken_at_frame_t_and_targets_the_next_row():
    T = 12
    t = np.arange(T, dtype=np.float32)
    series = [dict(mu=np.stack([t, t], 1), logvar=np.zeros((T, 2), np.float32), action=np.stack([10 * t] * 3, 1),
                   reward=100 * t, terminated=t == T - 1)]
    b = wm.mdn_batch(series, 5, 4, np.random.default_rng(0))
    start = b["mu"][:, 0, 0]
    for i in range(4):
        np.testing.assert_array_equal(b["mu"][:, i, 0], start + i)  # z_t
        np.testing.assert_array_equal(b["action"][:, i, 0], 10 * (start + i + 1))  # a_t, stored in row t + 1
        np.testing.assert_array_equal(b["mu"][:, i + 1, 0], start + i + 1)  # target z_{t+1}, the window's next row
        np.testing.assert_array_equal(b["reward"][:, i], 100 * (start + i + 1))  # r_{t+1}, earned by a_t
    np.testing.assert_array_equal(b["done"][:, -1], (start + 4 == T - 1).astype(np.float32))


def test_m_reads_and_predicts_one_draw_of_z_per_frame():
    """The target z_{t+1} is the very sample M is fed at step t+1 (official raw_z[:, :-1] / raw_z[:, 1:]), and the
    targets line up with the window's rows 1..T."""
    torch.manual_seed(0)
    B, T, d = 64, 6, 8
    mu = torch.arange(T + 1.0)[None, :, None].expand(B, T + 1, d) * 10
    z, z_next = wm.mdn_inputs_targets(dict(mu=mu, logvar=torch.zeros(B, T + 1, d)))  # σ = 1
    assert z.shape == z_next.shape == (B, T, d)
    torch.testing.assert_close(z_next[:, :-1], z[:, 1:], rtol=0, atol=0)  # one draw, not two
    for got, rows in ((z, mu[:, :-1]), (z_next, mu[:, 1:])):
        noise = got - rows
        assert noise.abs().mean() > 0.5 and noise.mean().abs() < 0.1  # N(0, 1) around the right row, not ±10 off


def test_mdn_update_runs_the_guard_before_stepping_and_clips_gradients_by_value():
    torch.manual_seed(0)
    rnn = wm.MDNRNN(4, 3, 8, 2)
    opt = torch.optim.Adam(rnn.parameters(), 1e-3)
    batch = dict(mu=torch.randn(2, 6, 4) * 3, logvar=torch.zeros(2, 6, 4), action=torch.rand(2, 5, 3),
                 reward=torch.zeros(2, 5), done=torch.zeros(2, 5))
    args = wm.Args(rnn_grad_clip=1e-4)
    before = [p.detach().clone() for p in rnn.parameters()]

    def refuse(loss):
        raise RuntimeError("non-finite")

    with pytest.raises(RuntimeError):
        wm.mdn_update(rnn, opt, batch, args, refuse)
    assert all(torch.equal(a, b) for a, b in zip(before, rnn.parameters()))  # the guard ran before any step
    wm.mdn_update(rnn, opt, batch, args, lambda loss: None)
    # Adam's first moment after one step is (1 - β1) g: with g clipped to ±1e-4 its largest entry is exactly 1e-5
    largest = max(opt.state[p]["exp_avg"].abs().max().item() for p in rnn.parameters())
    assert largest == pytest.approx(0.1 * 1e-4, rel=1e-5)


def test_the_lstm_starts_with_a_forget_gate_bias_of_one():
    rnn = wm.MDNRNN(4, 3, 6, 5)
    total = rnn.lstm.bias_ih_l0 + rnn.lstm.bias_hh_l0
    assert total[6:12].tolist() == [1.0] * 6 and total[:6].abs().sum() < 6  # gates i, f, g, o: only f is 1


def test_m_with_its_zero_input_is_the_lstm_over_z_and_a_alone():
    """z 32 + a 3 is odd, so M's LSTM reads one constant 0 after them (a speed measure): its outputs must equal an
    LSTM over [z, a] with M's other weights, and the zero input's weights must get no gradient."""
    rnn = wm.MDNRNN(32, 3, 16, 2)
    assert rnn.lstm.input_size == 36 and wm.MDNRNN(32, 4, 16, 2).lstm.input_size == 36  # padded only when odd
    plain = torch.nn.LSTM(35, 16, batch_first=True)
    with torch.no_grad():
        rnn.lstm.weight_ih_l0[:, 35:].normal_()  # whatever these weights hold, the input they read is 0
        for name, p in plain.named_parameters():
            p.copy_(getattr(rnn.lstm, name)[:, :35] if name == "weight_ih_l0" else getattr(rnn.lstm, name))
    z, a = torch.randn(3, 5, 32), torch.rand(3, 5, 3)
    torch.testing.assert_close(rnn.lstm(rnn.lstm_input(z, a))[0], plain(torch.cat([z, a], -1))[0])
    batch = dict(mu=torch.randn(4, 6, 32), logvar=torch.zeros(4, 6, 32), action=torch.rand(4, 5, 3),
                 reward=torch.zeros(4, 5), done=torch.zeros(4, 5))
    opt = torch.optim.Adam(rnn.parameters(), 1e-2)
    for bf16 in (False, True):  # oneDNN's fp32 and bf16 kernels
        pad_before, ih_before = rnn.lstm.weight_ih_l0[:, 35:].clone(), rnn.lstm.weight_ih_l0[:, :35].clone()
        wm.mdn_update(rnn, opt, batch, wm.Args(bf16=bf16), lambda loss: None)
        assert torch.equal(rnn.lstm.weight_ih_l0.grad[:, 35:], torch.zeros(64, 1))
        assert torch.equal(rnn.lstm.weight_ih_l0[:, 35:], pad_before)
        assert not torch.equal(rnn.lstm.weight_ih_l0[:, :35], ih_before)


# C ---------------------------------------------------------------------------------------------------
def test_controller_has_867_parameters_and_maps_z_h_to_valid_actions():
    size = wm.controller_size(32, 256)
    assert size == 867
    params = np.zeros(size, np.float32)
    params[:3] = [0.5, 0.3, -0.4]  # b first (official layout), W = 0
    a = wm.controller_action(params, torch.randn(1, 32), torch.randn(1, 256))
    expected_env = np.array([np.tanh(0.5), (np.tanh(0.3) + 1) / 2, 0.0])  # steer, gas, brake (brake clipped at 0)
    np.testing.assert_allclose(a[0].numpy(), [expected_env[0], 2 * expected_env[1] - 1, 2 * expected_env[2] - 1],
                               rtol=1e-6)
    big = np.random.default_rng(0).standard_normal((50, size)).astype(np.float32) * 10
    a = wm.controller_action(big, torch.randn(50, 32), torch.randn(50, 256))
    assert a.shape == (50, 3) and a.abs().max() <= 1.0
    params = np.zeros(size, np.float32)
    params[3 + 3 * 32 + 0] = 1.0  # W row of h_0 → steer: C reads h (after z), not the cell state
    h = torch.zeros(1, 256)
    h[0, 0] = 0.7
    assert wm.controller_action(params, torch.zeros(1, 32), h)[0, 0].item() == pytest.approx(np.tanh(0.7), rel=1e-6)


class ThreeStepEnv:
    """Three random frames, reward 1 per step, ends after the third step; records the actions it receives."""

    def __init__(self):
        self.frames = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
        self.actions, self.t = [], 0

    def reset(self, seed=None):
        self.t = 0
        return self.frames[0], {}

    def step(self, action):
        self.actions.append(np.array(action))
        self.t += 1
        return self.frames[self.t], 1.0, self.t == 3, False, {}


def test_the_controller_reads_h_t_before_m_sees_z_t_and_a_t():
    torch.manual_seed(0)
    vae, rnn = wm.VAE(8), wm.MDNRNN(8, 3, 6, 2)
    with torch.no_grad():  # z = μ: make V's posterior a point so the expected actions can be recomputed
        vae.logvar.weight.zero_()
        vae.logvar.bias.fill_(-60.0)
    params = np.random.default_rng(1).standard_normal(wm.controller_size(8, 6)).astype(np.float32)
    env = ThreeStepEnv()
    assert wm.run_controller(env, vae, rnn, params, 0, 100) == 3.0
    with torch.no_grad():
        z = vae.encode(wm.frames_to_tensor(env.frames[:3]))[0]  # z_0, z_1, z_2
        a0 = wm.controller_action(params, z[:1], torch.zeros(1, 6))  # h_0 = 0
        h1 = rnn.lstm(rnn.lstm_input(z[:1], a0)[:, None])[0][:, 0]  # h_1 = LSTM(z_0, a_0)
        a1 = wm.controller_action(params, z[1:2], h1)
        h2 = rnn.lstm(rnn.lstm_input(z[:2], torch.cat([a0, a1]))[None])[0][:, 1]  # h_2 = LSTM(z_1, a_1 | h_1)
        a2 = wm.controller_action(params, z[2:3], h2)
    np.testing.assert_allclose(np.stack(env.actions), torch.cat([a0, a1, a2]).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(env.actions[1], wm.controller_action(params, z[1:2], torch.zeros(1, 6))[0].numpy())


def test_dream_rollouts_sum_predicted_rewards_until_predicted_done():
    rnn = wm.MDNRNN(4, 3, 8, 2, reward_done=True)
    params = np.zeros((3, wm.controller_size(4, 8)), np.float32)
    with torch.no_grad():
        rnn.mdn.weight.zero_()
        rnn.mdn.bias.zero_()
        rnn.mdn.bias[-2] = 2.0  # every predicted reward is 2
        rnn.mdn.bias[-1] = -10.0  # never done
    np.testing.assert_allclose(wm.dream_fitness(rnn, params, torch.zeros(2, 4), 5, 1.0), [10.0] * 3, rtol=1e-5)
    with torch.no_grad():
        rnn.mdn.bias[-1] = 10.0  # done after the first step: its reward counts, nothing after it
    np.testing.assert_allclose(wm.dream_fitness(rnn, params, torch.zeros(2, 4), 5, 1.0), [2.0] * 3, rtol=1e-5)


def test_brownian_policy_stays_in_the_box_and_moves_smoothly():
    a = wm.brownian_actions(np.random.default_rng(0), 500, 1 / 50)
    assert a.shape == (500, 3) and np.abs(a).max() <= 1
    assert np.abs(np.diff(a, axis=0)).max() < 1.0 and np.abs(np.diff(a, axis=0)).mean() < 0.15


# The pipeline ----------------------------------------------------------------------------------------
TINY = ["--preset", "small", "--no-cuda", "--num-workers", "2", "--num-rollouts", "4", "--max-episode-steps", "50",
        "--vae-epochs", "1", "--vae-batch-size", "20", "--rnn-steps", "20", "--rnn-seq-len", "16", "--rnn-batch-size",
        "4", "--population", "4", "--rollouts-per-candidate", "1", "--generations", "1", "--eval-episodes", "1",
        "--log-every", "5"]


def test_all_four_stages_run_end_to_end_and_a_rerun_skips_them(tmp_path):
    out = run_script(SCRIPT, TINY, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = only_run_dir(tmp_path)
    files = sorted(glob.glob(os.path.join(run_dir, "episodes", "*.npz")))
    assert len(files) == 4
    ep = np.load(files[0])
    assert ep["obs"].dtype == np.uint8 and ep["obs"].shape == (51, 3, 64, 64) and ep["is_first"][0] and ep["truncated"][-1]
    assert len(glob.glob(os.path.join(run_dir, "series", "*.npz"))) == 4
    acc = events(run_dir)
    for tag in ("losses/vae_loss", "losses/vae_kl", "losses/mdn_nll", "charts/fitness_best", "charts/fitness_mean",
                "eval/episodic_return", "charts/episodic_return"):
        assert tag in acc.Tags()["scalars"], tag
    assert "media/openloop" in acc.Tags()["images"] and "media/vae_reconstruction" in acc.Tags()["images"]
    state = checkpoint(run_dir)["state"]
    assert state["done"] == ["data", "vae", "mdnrnn", "controller"] and len(state["best_params"]) == 867
    out = run_script(SCRIPT, [*TINY, "--resume", run_dir], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in ("data", "vae", "mdnrnn", "controller"):
        assert f"{stage}: finished earlier, skipped" in out.stdout
    assert checkpoint(run_dir)["state"]["vae_updates"] == state["vae_updates"]  # nothing trained again


def test_a_stopped_run_resumes_in_the_stage_it_was_stopped_in(tmp_path):
    long = [*TINY, "--vae-epochs", "1000"]  # SIGTERM arrives while V trains
    code, out = start_and_terminate(SCRIPT, long, tmp_path, settle=3.0)
    assert code == 130 and "interrupted in stage vae" in out, out
    run_dir = only_run_dir(tmp_path)
    state = checkpoint(run_dir)["state"]
    assert state["done"] == ["data"] and state["vae_updates"] > 0
    out = run_script(SCRIPT, [*TINY, "--vae-epochs", str(state["vae_epoch"] + 1), "--resume", run_dir, "--stage", "vae"],
                     tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert checkpoint(run_dir)["state"]["vae_updates"] > state["vae_updates"]  # continued, not restarted
    assert len(glob.glob(os.path.join(run_dir, "episodes", "*.npz"))) == 4  # no rollout collected twice


def test_bad_inputs_get_one_sentence(tmp_path, monkeypatch, capsys):
    for extra, words in ((["--env-id", "Pendulum-v1"], "built for CarRacing"),
                         (["--stage", "vae"], "pass --resume"),
                         (["--stage", "dream"], "--stage must be one of")):
        code, told = stop_in_process(wm, [*TINY, *extra], tmp_path, monkeypatch, capsys)
        assert code != 0 and words in told, told


def test_sigterm_to_the_whole_process_group_stops_the_controller_stage_cleanly(tmp_path):
    """`timeout` and job control signal every process of the group, the rollout workers included; the run must
    still save and exit 130 instead of waiting forever for the killed workers' results."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, SCRIPT, *TINY, "--generations", "1000"], cwd=tmp_path, env=SCRIPT_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        time.sleep(0.5)
        path = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
        try:
            if path and torch.load(path[0], weights_only=False)["state"]["generation"] >= 1:
                break
        except (EOFError, RuntimeError):  # caught mid-rename
            continue
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted in stage controller" in out, out
    state = checkpoint(only_run_dir(tmp_path))["state"]
    assert state["done"] == ["data", "vae", "mdnrnn"] and state["generation"] >= 1
