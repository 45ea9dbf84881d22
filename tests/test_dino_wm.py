"""DINO-WM: the frame-causal predictor, the latent layout, frameskip alignment, CEM, the DINOv2 key layout,
and smoke runs of the real script (generate, train, plan) on PointMaze, PushT and Wall."""

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import checkpoint, events, only_run_dir, run_script, script, start_and_terminate, stop_in_process
import dino_wm as D  # noqa: E402  (tests.helpers puts algos/ on the path)
from common.goal_envs import make_goal_env  # noqa: E402

SCRIPT = script("dino_wm.py")
TINY = ["--preset", "small", "--total-timesteps", "60", "--episode-length", "30", "--train-steps", "4", "--log-every",
        "2", "--depth", "1", "--heads", "2", "--dim-head", "8", "--mlp-dim", "16", "--batch-size", "4", "--samples",
        "8", "--elites", "2", "--cem-iters", "2", "--max-replans", "1", "--eval-episodes", "1", "--encoder", "pixels",
        "--image-size", "28", "--frame-size", "32"]


def tiny_args(**kw):
    base = dict(image_size=28, depth=2, heads=2, dim_head=8, mlp_dim=16, dropout=0.0, frameskip=2)
    return dataclasses.replace(D.Args(), **{**base, **kw})


def tiny_model(**kw):
    torch.manual_seed(0)
    args = tiny_args(**kw)
    return D.WorldModel(D.PixelPatches(), proprio_dim=3, action_dim=2, patches=4, args=args).eval(), args


# Predictor and latent layout ---------------------------------------------------------------------
def test_frame_causal_mask_by_hand():
    m = D.frame_causal_mask(3, 2)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_changing_a_later_frame_changes_no_prediction_for_earlier_frames():
    wm, _ = tiny_model()
    z = torch.randn(2, 3, 4, wm.predictor.pos_embedding.shape[-1])
    changed = z.clone()
    changed[:, 2] += torch.randn_like(changed[:, 2])  # frame 2's tokens
    a, b = wm.predictor(z), wm.predictor(changed)
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2], b[:, 2])
    changed = z.clone()
    changed[:, 1, 3] += 1.0  # one patch of frame 1 reaches every patch of frames 1 and 2
    c = wm.predictor(changed)
    torch.testing.assert_close(a[:, 0], c[:, 0])
    assert not torch.allclose(a[:, 1, 0], c[:, 1, 0])


def test_frame_causality_holds_in_training_with_dropout():
    wm, _ = tiny_model(dropout=0.5)
    wm.train()
    z = torch.randn(2, 3, 4, wm.predictor.pos_embedding.shape[-1])
    changed = z.clone()
    changed[:, 2] += 1.0
    torch.manual_seed(1)
    a = wm.predictor(z)
    torch.manual_seed(1)  # the same dropout masks
    b = wm.predictor(changed)
    torch.testing.assert_close(a[:, :2], b[:, :2])
    assert not torch.allclose(a[:, 2], b[:, 2])


def test_proprio_and_action_embeddings_are_concatenated_to_every_patch_of_their_own_frame():
    wm, args = tiny_model()
    wm.proprio_mean.fill_(0.5), wm.proprio_std.fill_(2.0)
    feats = torch.randn(1, 3, 4, 588)
    proprio = torch.randn(1, 3, 3)
    action = torch.randn(1, 3, 2 * args.frameskip)
    z = wm.latent(feats, proprio, action)
    assert z.shape == (1, 3, 4, 588 + 10 + 10)
    torch.testing.assert_close(z[..., :588], feats)
    for t in range(3):
        e_p = wm.proprio_encoder((proprio[0, t] - 0.5) / 2.0)
        e_a = wm.action_encoder(action[0, t])
        for p in range(4):
            torch.testing.assert_close(z[0, t, p, 588:598], e_p)
            torch.testing.assert_close(z[0, t, p, 598:], e_a)


def hand_episode(n=30, f=5):
    """obs rows filled with their index, action rows = (index, -index), proprio = index."""
    return dict(obs=np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(3, 1).repeat(2, 2).repeat(2, 3),
                action=np.stack([np.arange(n), -np.arange(n)], 1).astype(np.float32),
                proprio=np.arange(n, dtype=np.float32)[:, None])


def test_frameskip_groups_the_actions_taken_after_each_frame():
    ep = hand_episode()
    w = D.gather_window([ep], 0, 3, frames=4, f=5)
    assert w["rows"].tolist() == [3, 8, 13, 18]
    assert w["obs"][:, 0, 0, 0].tolist() == [3, 8, 13, 18] and w["proprio"][:, 0].tolist() == [3, 8, 13, 18]
    # frame 3 was followed by the actions that produced rows 4..8: action rows 4, 5, 6, 7, 8
    assert w["action"][0].reshape(5, 2)[:, 0].tolist() == [4, 5, 6, 7, 8]
    assert w["action"][3].reshape(5, 2)[:, 0].tolist() == [19, 20, 21, 22, 23]
    assert w["action"][1].tolist() == [9, -9, 10, -10, 11, -11, 12, -12, 13, -13]  # (a_x, a_y) per step, in order
    # windows end where the last frame's actions are still held: 30 rows, 4 frames × 5 -> starts 0..9
    starts = D.window_starts([30], frames=4, frameskip=5)
    assert starts[:, 1].tolist() == list(range(10))


def test_prediction_loss_compares_the_output_at_frame_t_with_frame_t_plus_1():
    wm, _ = tiny_model()
    wm.predictor.forward = lambda z: z  # an identity predictor: the loss is then the change from t to t + 1
    z = torch.randn(2, 4, 4, 608)
    loss, m = D.prediction_loss(wm, z)
    expected = (z[:, :3, :, :-10] - z[:, 1:, :, :-10]).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(m["z_visual_loss"], (z[:, :3, :, :588] - z[:, 1:, :, :588]).pow(2).mean())
    z2 = z.clone()
    z2[..., -10:] += 5.0  # the action dims are not predicted
    torch.testing.assert_close(D.prediction_loss(wm, z2)[0], expected)


def test_rollout_inserts_each_action_and_predicts_from_the_last_num_hist_frames():
    wm, _ = tiny_model()
    seen = []

    def predictor(z):
        seen.append(z.shape[1])
        return z + 1.0  # every frame's successor: the frame plus one

    wm.predictor.forward = predictor
    z0 = torch.zeros(1, 1, 4, 608)
    actions = torch.randn(1, 5, 4)
    z = D.rollout(wm, z0, actions)
    assert z.shape[1] == 6 and seen == [1, 2, 3, 3, 3]  # 4 insertions + the final prediction, window ≤ num_hist
    for t in range(5):
        torch.testing.assert_close(z[0, t, 0, -10:], wm.action_encoder(actions[0, t]))
        torch.testing.assert_close(z[0, t, :, :598], torch.full((4, 598), float(t)))
    torch.testing.assert_close(z[0, 5, :, :598], torch.full((4, 598), 5.0))


def test_planning_cost_by_hand():
    wm, _ = tiny_model()
    z_final = torch.zeros(2, 4, 608)
    z_goal = torch.zeros(1, 4, 608)
    z_final[0, :, :588] = 2.0  # visual error 4 per element
    z_final[1, :, 588:598] = 1.0  # proprio error 1 per element, over 10 of the 20 non-visual dims
    z_final[:, :, 598:] = 9.0  # action dims do not count
    cost = D.planning_cost(wm, z_final, z_goal, alpha=0.1)
    torch.testing.assert_close(cost, torch.tensor([4.0, 0.1 * 1.0]))


def test_cem_finds_the_optimum_of_a_toy_cost():
    torch.manual_seed(0)
    target = torch.tensor([[0.3, -0.5], [0.8, 0.1], [-0.2, 0.6]])
    low, high = -torch.ones(2), torch.ones(2)
    mu = D.cem(lambda a: (a - target).pow(2).sum((1, 2)), 3, 2, samples=300, elites=30, iters=10, var_scale=1.0,
               low=low, high=high)
    torch.testing.assert_close(mu, target, atol=0.05, rtol=0)


# The DINOv2 encoder ------------------------------------------------------------------------------
def official_vits14_state_dict():
    """The key names and shapes of the official dinov2_vits14 checkpoint, written out here."""
    d, state = 384, {"cls_token": (1, 1, 384), "pos_embed": (1, 1370, 384), "mask_token": (1, 384),
                     "patch_embed.proj.weight": (384, 3, 14, 14), "patch_embed.proj.bias": (384,),
                     "norm.weight": (384,), "norm.bias": (384,)}
    for i in range(12):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                      b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                      b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                      b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d),
                      b + "mlp.fc2.bias": (d,), b + "ls2.gamma": (d,)})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(*s, generator=g) * 0.02 for k, s in state.items()}


def test_official_layout_state_dict_loads_cleanly_and_gives_patch_features(tmp_path):
    state = official_vits14_state_dict()
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(state, path)
    enc = D.DinoV2()
    D.load_encoder_weights(enc, str(path))
    torch.testing.assert_close(enc.blocks[11].ls2.gamma, state["blocks.11.ls2.gamma"])
    with torch.no_grad():
        feats = enc(torch.rand(2, 3, 56, 56) * 2 - 1)
    assert feats.shape == (2, 16, 384)  # 4×4 patches, the 37×37 position grid resized
    torch.save({k: v for k, v in state.items() if k != "norm.bias"}, path)
    with pytest.raises(SystemExit, match="missing"):
        D.load_encoder_weights(D.DinoV2(), str(path))


def test_goal_envs_restore_states_exactly():
    for env_id in ("Wall-v0", "PushT-v0"):
        env = make_goal_env(env_id, 32)
        env.reset(3)
        for _ in range(5):
            frame, _ = env.step(np.array([0.7, -0.4]))
        state = env.state()
        assert env.success(state)
        env.reset(4)
        restored, _ = env.set_state(state)
        np.testing.assert_allclose(env.state(), state, atol=1e-6)
        np.testing.assert_array_equal(restored, frame)
        env.close()


def test_wall_blocks_the_dot_outside_the_door():
    env = make_goal_env("Wall-v0", 64)
    env.reset(0)
    env.set_state([28.0, 2.0, 40.0])  # far from the door (centre 40, half-width 6)
    for _ in range(10):
        env.step([1.0, 0.0])
    assert env.state()[0] < 31
    env.set_state([28.0, 40.0, 40.0])  # in front of the door
    for _ in range(10):
        env.step([1.0, 0.0])
    assert env.state()[0] > 40


# Smoke runs of the real script ---------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["PointMaze_UMaze-v3", "PushT-v0"])
def test_smoke_generate_train_plan(tmp_path, env_id):
    out = run_script(SCRIPT, [*TINY, "--env-id", env_id], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eval: success rate" in out.stdout
    run_dir = only_run_dir(tmp_path)
    scalars = events(run_dir).Tags()["scalars"]
    for tag in ("world_model/z_loss", "world_model/z_visual_loss", "perf/train_step_ms", "eval/success", "eval/success_rate"):
        assert tag in scalars, (tag, scalars)
    ckpt = checkpoint(run_dir)
    assert ckpt["updates"] == 4 and len(ckpt["results"]) == 1
    assert len(os.listdir(os.path.join(run_dir, "episodes"))) == 2


def test_random_init_dino_encoder_is_announced_and_decoder_video_written(tmp_path):
    args = [a for a in TINY if a not in ("--encoder", "pixels")]
    out = run_script(SCRIPT, [*args, "--env-id", "Wall-v0", "--encoder", "dino", "--decoder", "--video-every", "2",
                              "--capture-video"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RANDOM weights" in out.stdout
    images = events(only_run_dir(tmp_path)).Tags()["images"]
    assert "media/openloop" in images and "media/eval" in images


def test_stop_and_resume_keeps_the_dataset_model_and_evaluation(tmp_path):
    args = [*TINY, "--env-id", "Wall-v0", "--train-steps", "100000", "--checkpoint-every", "2"]
    code, out = start_and_terminate(SCRIPT, args, tmp_path)
    assert code == 130, out
    run_dir = only_run_dir(tmp_path)
    before = checkpoint(run_dir)["updates"]
    assert before >= 2
    episodes = sorted(os.listdir(os.path.join(run_dir, "episodes")))
    out = run_script(SCRIPT, [*TINY, "--env-id", "Wall-v0", "--train-steps", str(before + 2), "--resume", run_dir], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed {run_dir} at update {before}" in out.stdout and "generating" not in out.stdout
    assert sorted(os.listdir(os.path.join(run_dir, "episodes"))) == episodes
    assert checkpoint(run_dir)["updates"] == before + 2


def test_bad_inputs_get_one_sentence(tmp_path, monkeypatch, capsys):
    for extra, words in ((["--env-id", "CartPole-v1"], "plans towards goal images"),
                         (["--env-id", "Wall-v0", "--image-size", "30"], "multiple of the 14-px patch"),
                         (["--env-id", "Wall-v0", "--encoder", "dino", "--encoder-weights", str(tmp_path / "x.pth")], "is not a file"),
                         (["--env-id", "Wall-v0", "--elites", "20"], "--elites"),
                         (["--env-id", "Wall-v0", "--resume", str(tmp_path / "nope")], "Cannot resume")):
        code, told = stop_in_process(D, [*TINY, *extra], tmp_path, monkeypatch, capsys)
        assert code != 0 and words in told, told


def test_masked_attention_with_dropout_has_the_plain_attention_as_its_mean():
    # The CPU's written-out path and the fused call CUDA takes both average to the masked attention without
    # dropout (keys of later frames left out); 4,000 independent draws along the batch axis.
    mask = D.frame_causal_mask(3, 2)
    q, k, v = (torch.randn(1, 2, 6, 4).expand(4000, -1, -1, -1) for _ in range(3))
    plain = D.masked_attention(q[:1], k[:1], v[:1], mask, 0.0)[0]
    written_out = D.masked_attention(q, k, v, mask, 0.5).mean(0)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.5).mean(0)
    assert torch.allclose(written_out, plain, atol=0.08) and torch.allclose(fused, plain, atol=0.08)
    assert torch.allclose(plain[:, :2], F.scaled_dot_product_attention(q[0, :, :2], k[0, :, :2], v[0, :, :2]))
