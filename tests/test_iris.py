"""IRIS: tokenizer, transformer and actor-critic math by hand, the replay-to-block alignment, and smoke runs."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import (
    check_resume_doubles_the_run, checkpoint, events, kill_and_resume, only_run_dir, run_script, script,
    stop_in_process,
)
import iris as I  # noqa: E402  (tests.helpers puts algos/ on the path)
from common.replay import Replay  # noqa: E402

SCRIPT = script("iris.py")
TINY = ["--resolution", "16", "--channels", "8", "--ch-mult", "1", "1", "1", "--res-blocks", "1", "--attn-resolutions",
        "8", "--z-channels", "8", "--embed-dim", "8", "--vocab-size", "16", "--layers", "1", "--heads", "2", "--embed",
        "16", "--max-blocks", "4", "--horizon", "3", "--burn-in", "2", "--tokenizer-batch", "4",
        "--world-model-batch", "2", "--actor-critic-batch", "2", "--steps-per-epoch", "20", "--tokenizer-start", "0",
        "--world-model-start", "0", "--actor-critic-start", "1", "--tokenizer-updates", "2", "--world-model-updates", "2",
        "--actor-critic-updates", "2", "--final-epochs", "0", "--eval-episodes", "1", "--video-every", "2",
        "--log-every", "40"]


def tiny_args(**kw):
    base = dict(resolution=16, channels=8, ch_mult=(1, 1, 1), res_blocks=1, attn_resolutions=(8,), z_channels=8,
                embed_dim=8, vocab_size=16, layers=2, heads=2, embed=16, max_blocks=4, dropout=0.0, attn_dropout=0.0)
    return dataclasses.replace(I.Args(), **{**base, **kw})


# Tokenizer -------------------------------------------------------------------------------------
def test_codebook_assignment_matches_brute_force_nearest_neighbour():
    torch.manual_seed(0)
    tok = I.Tokenizer(3, tiny_args())
    tok.codebook.weight.data.normal_()
    z = torch.randn(2, 8, 4, 4)
    tokens, z_q = tok.quantize(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    book = tok.codebook.weight.detach().numpy()
    brute = np.array([np.argmin([np.sum((v - e) ** 2) for e in book]) for v in flat])
    np.testing.assert_array_equal(tokens.flatten().numpy(), brute)
    np.testing.assert_allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 8).detach().numpy(), book[brute])


def test_straight_through_sends_the_reconstruction_gradient_to_the_encoder_and_each_vq_term_to_one_side():
    torch.manual_seed(0)
    tok = I.Tokenizer(3, tiny_args())
    frames = torch.rand(4, 3, 16, 16)
    _, metrics = I.tokenizer_loss(tok, frames)
    enc, book = tok.encoder.net[0].weight, tok.codebook.weight
    g_enc, g_book = torch.autograd.grad(metrics["reconstruction_loss"], [enc, book], allow_unused=True, retain_graph=True)
    assert g_enc.abs().sum() > 0  # copied through the quantizer to the encoder
    assert g_book is None or g_book.abs().sum() == 0  # the reconstruction never moves the codebook
    g_enc, g_book = torch.autograd.grad(metrics["codebook_loss"], [enc, book], allow_unused=True, retain_graph=True)
    assert (g_enc is None or g_enc.abs().sum() == 0) and g_book.abs().sum() > 0
    g_enc, g_book = torch.autograd.grad(metrics["commitment_loss"], [enc, book], allow_unused=True, retain_graph=True)
    assert g_enc.abs().sum() > 0 and (g_book is None or g_book.abs().sum() == 0)


def test_bernoulli_reconstruction_is_the_cross_entropy_of_the_decoders_logits_and_decodes_to_their_sigmoid():
    torch.manual_seed(0)
    tok = I.Tokenizer(4, tiny_args(reconstruction="bernoulli"))
    frames = (torch.rand(3, 4, 16, 16) < 0.2).float()  # binary object channels, as MinAtar's
    _, metrics = I.tokenizer_loss(tok, frames)
    with torch.no_grad():
        z, z_q, tokens = tok.encode(frames)
        p = tok.decoder(tok.post_quant(z_q)).sigmoid()  # the forward value of z + sg(z_q − z) is z_q
        by_hand = -(frames * p.log() + (1 - frames) * (1 - p).log()).mean()
        torch.testing.assert_close(metrics["reconstruction_loss"], by_hand, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tok.decode_tokens(tokens), p, rtol=1e-4, atol=1e-5)


def test_tokenizer_update_in_micro_batches_takes_the_gradient_of_the_whole_batch(monkeypatch):
    torch.manual_seed(0)
    frames = torch.rand(5, 3, 16, 16)
    tok = I.Tokenizer(3, tiny_args())
    loss, _ = I.tokenizer_loss(tok, frames)
    full = torch.autograd.grad(loss, list(tok.parameters()), allow_unused=True)
    monkeypatch.setattr(I, "CHUNK", 2)  # chunks of 2, 2 and 1 frames
    opt = torch.optim.SGD(tok.parameters(), lr=0.0)
    metrics = I.tokenizer_update(tok, opt, frames, clip=1e9, autocast=torch.autocast("cpu", enabled=False))
    for g, p in zip(full, tok.parameters()):
        if g is not None:
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], float(loss), rtol=1e-5)


def test_chunked_encoding_without_gradient_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    tok = I.Tokenizer(3, tiny_args()).eval()
    frames = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        one = tok.encode_decode(frames)
        monkeypatch.setattr(I, "CHUNK", 2)
        torch.testing.assert_close(tok.encode_decode(frames), one)


def test_paper_tokenizer_makes_16_tokens_per_64x64_frame_and_decodes_back_to_the_frame_shape():
    tok = I.Tokenizer(3, I.Args())  # 64×64, five levels, attention at 16 and 8
    assert tok.tokens_per_frame == 16
    with torch.no_grad():
        _, z_q, tokens = tok.encode(torch.rand(2, 5, 3, 64, 64))
        assert tokens.shape == (2, 5, 16) and tokens.max() < 512 and z_q.shape == (10, 512, 4, 4)
        assert tok.decode_tokens(tokens).shape == (2, 5, 3, 64, 64)


def test_patch_encoder_codes_each_patch_from_that_patch_alone():
    torch.manual_seed(0)
    a = (torch.rand(2, 4, 16, 16) > 0.5).float()
    b = a.clone()
    b[:, :, 4:] = (torch.rand(2, 4, 12, 16) > 0.5).float()  # every patch changes except the top row (pixel rows 0-3)
    for encoder, same in (("patch", True), ("taming", False)):  # the official encoder mixes neighbours and frame statistics
        tok = I.Tokenizer(4, tiny_args(encoder=encoder))
        with torch.no_grad():
            za, zb = tok.encode(a)[0], tok.encode(b)[0]
        assert torch.allclose(za[..., 0, :], zb[..., 0, :], atol=1e-6) == same, encoder


class FixedEncoder(torch.nn.Module):
    """Stands in for the encoder: returns the given (1, E, 2, 2) outputs whatever the frames."""

    def __init__(self, z):
        super().__init__()
        self.z = z

    def forward(self, x):
        return self.z.expand(len(x), -1, -1, -1)


def test_codebook_restart_moves_only_dead_codes_and_only_onto_misfit_outputs():
    tok = I.Tokenizer(3, tiny_args(resolution=8, ch_mult=(1, 1, 1), z_channels=2, embed_dim=2, vocab_size=4))
    tok.pre_quant.weight.data.copy_(torch.eye(2)[:, :, None, None])
    tok.pre_quant.bias.data.zero_()
    book = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-5.0, -5.0], [-6.0, -6.0]])
    tok.codebook.weight.data.copy_(book)
    # code 2 idle long enough to be dead after this update; code 3 unpicked here but still alive after two more
    tok.idle.copy_(torch.tensor([0, 7, I.DEAD_AFTER - 1, I.DEAD_AFTER - 3]))
    fitted = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    tok.encoder = FixedEncoder(torch.tensor(fitted).t().reshape(1, 2, 2, 2))
    assert I.restart_dead_codes(tok, torch.zeros(3, 3, 8, 8)) == 0  # nothing misfit: nothing moves
    torch.testing.assert_close(tok.codebook.weight.data, book)
    misfit = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.8]]  # the last is 0.29 from code 1; mean |z|² 0.97
    tok.encoder = FixedEncoder(torch.tensor(misfit).t().reshape(1, 2, 2, 2))
    assert I.restart_dead_codes(tok, torch.zeros(3, 3, 8, 8)) == 1
    torch.testing.assert_close(tok.codebook.weight.data, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.8], [-6.0, -6.0]]))
    assert tok.idle.tolist() == [0, 0, 0, I.DEAD_AFTER - 1]  # picked codes and the moved one start counting again
    assert tok.encode(torch.zeros(1, 3, 8, 8))[2].tolist() == [[0, 0, 1, 2]]  # the misfit content has its own code


def test_lpips_loads_a_state_dict_with_tamings_key_names_and_measures_zero_between_equal_images(tmp_path):
    convs = {0: 3, 2: 64, 5: 64, 7: 128, 10: 128, 12: 256, 14: 256, 17: 256, 19: 512, 21: 512, 24: 512, 26: 512, 28: 512}
    outs = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256, 17: 512, 19: 512, 21: 512, 24: 512, 26: 512, 28: 512}
    slices = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
    state = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1), "scaling_layer.scale": torch.ones(1, 3, 1, 1)}
    for j, c_in in convs.items():
        s = next(i for i, (a, b) in enumerate(slices) if a <= j < b) + 1
        state[f"net.slice{s}.{j}.weight"] = torch.randn(outs[j], c_in, 3, 3) * 0.05
        state[f"net.slice{s}.{j}.bias"] = torch.zeros(outs[j])
    for i, c in enumerate([64, 128, 256, 512, 512]):
        state[f"lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1)
    path = tmp_path / "lpips.pth"
    torch.save(state, path)
    lpips = I.load_lpips(str(path), "cpu")
    torch.testing.assert_close(getattr(lpips.net.slice3, "12").weight, state["net.slice3.12.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(lpips(x, x)) == 0.0 and float(lpips(x, -x)) > 0.0
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(SystemExit, match="does not match the LPIPS layout"):
        I.load_lpips(str(path), "cpu")


# Transformer -----------------------------------------------------------------------------------
def blocks(wm, b=2, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 16, (b, steps, wm.k), generator=g)
    act = torch.randint(0, 3, (b, steps, 1), generator=g)
    return torch.cat([obs, act], 2).flatten(1)


def test_kv_cache_generation_gives_the_logits_of_a_full_uncached_forward():
    torch.manual_seed(0)
    wm = I.WorldModel(4, 3, tiny_args()).eval()
    tokens = blocks(wm)  # 3 blocks of 4 obs + 1 action
    full = wm(tokens)
    cache, parts = wm.new_cache(), []
    parts.append(wm(tokens[:, :7], cache))  # a prefix at once, then one token at a time
    for i in range(7, tokens.shape[1]):
        parts.append(wm(tokens[:, i:i + 1], cache))
    for j in range(3):
        torch.testing.assert_close(torch.cat([p[j] for p in parts], 1), full[j], atol=1e-5, rtol=1e-5)
    assert cache["size"] == 15


def test_causal_mask_hides_future_tokens():
    torch.manual_seed(0)
    wm = I.WorldModel(4, 3, tiny_args()).eval()
    tokens = blocks(wm)
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 16  # block 1, obs token 3
    a, b = wm(tokens), wm(changed)
    # obs-head positions are 0,1,2,4 | 5,6,7,9 | ...: outputs 0..6 read positions ≤ 7 only
    torch.testing.assert_close(a[0][:, :7], b[0][:, :7])
    assert not torch.allclose(a[0][:, 7:], b[0][:, 7:])
    torch.testing.assert_close(a[1][:, :1], b[1][:, :1])  # block 0's reward is read at position 4
    assert not torch.allclose(a[1][:, 1:], b[1][:, 1:])


def test_causal_mask_holds_in_training_with_attention_dropout():
    torch.manual_seed(0)
    wm = I.WorldModel(4, 3, tiny_args(dropout=0.1, attn_dropout=0.5)).train()
    tokens = blocks(wm)
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 16
    torch.manual_seed(1)
    a = wm(tokens)
    torch.manual_seed(1)  # the same dropout masks
    b = wm(changed)
    torch.testing.assert_close(a[0][:, :7], b[0][:, :7])
    assert not torch.allclose(a[0][:, 7:], b[0][:, 7:])
    torch.manual_seed(1)
    assert not torch.allclose(wm(tokens)[0], wm.eval()(tokens)[0])  # dropout is on in training


def test_reward_and_termination_heads_read_the_action_token_of_their_own_step():
    torch.manual_seed(0)
    wm = I.WorldModel(4, 3, tiny_args()).eval()
    tokens = blocks(wm)
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 3  # a_1, the action token of block 1 (position K = 4 of the block)
    a, b = wm(tokens), wm(changed)
    for head in (1, 2):  # reward, termination: (B, steps, classes)
        torch.testing.assert_close(a[head][:, 0], b[head][:, 0])  # step 0 cannot see a_1
        assert not torch.allclose(a[head][:, 1], b[head][:, 1])  # step 1's reward/end is what a_1 did
    # and the action token is embedded with the action table: its embedding changes only outputs from position 4 on
    wm.act_emb.weight.data += torch.randn_like(wm.act_emb.weight)
    c = wm(tokens)
    torch.testing.assert_close(a[0][:, :3], c[0][:, :3])  # obs-head outputs at positions 0, 1, 2
    assert not torch.allclose(a[0][:, 3], c[0][:, 3])  # … and at position 4, the action token


def test_world_model_labels_by_hand():
    # two steps of K = 2 tokens: o_0 = (1, 2), o_1 = (3, 4); obs-head outputs predict 2, 3 (at a_0), 4, (next)
    obs_tokens = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    rewards = torch.tensor([[0.5, -2.0], [0.0, 1.0]])
    ends = torch.tensor([[False, True], [False, False]])
    mask = torch.tensor([[True, True], [True, False]])  # the second sequence's step 1 is padding
    labels_obs, labels_reward, labels_end = I.world_model_labels(obs_tokens, rewards, ends, mask)
    assert labels_obs.tolist() == [[2, 3, 4], [6, -100, -100]]
    assert labels_reward.tolist() == [[2, 0], [1, -100]]
    assert labels_end.tolist() == [[0, 1], [0, -100]]


# Replay -> blocks ------------------------------------------------------------------------------
def hand_replay():
    """Two episodes: 4 steps ending in a termination, then 3 steps cut by a time limit. obs[t] is filled with
    10·episode + t, action[t] = t (the action whose step returned obs[t]), reward[t] = 100·episode + t."""
    replay = Replay(100)
    for e, (steps, term) in enumerate(((4, True), (3, False))):
        for t in range(steps + 1):
            replay.add(obs=np.full((1, 2, 2), 10 * e + t, np.uint8), action=np.int64(t % 3), reward=100 * e + t,
                       terminated=term and t == steps, truncated=(not term) and t == steps, is_first=t == 0)
    return replay


def test_each_block_pairs_a_frame_with_the_action_taken_there_and_what_it_earned():
    replay = hand_replay()
    spans = I.episode_spans(replay)
    assert spans.tolist() == [[0, 4], [5, 3]]  # n rows -> n - 1 blocks, the terminal frame is never a block's frame
    for from_start in (True, False):
        seg = I.sample_segments(replay, spans, 200, 3, from_start)
        for b in range(200):
            for t in np.flatnonzero(seg["mask"][b]):
                v = int(seg["obs"][b, t, 0, 0, 0])
                e, k = divmod(v, 10)  # frame o_k of episode e
                assert seg["action"][b, t] == (k + 1) % 3  # a_k: the action that frame was followed by
                assert seg["reward"][b, t] == 100 * e + k + 1  # r_k: what a_k earned
                assert seg["end"][b, t] == (e == 0 and k == 3)  # a time limit (episode 1) is not an end
        # padding only after the end (from_start) or before the start (segments that end at a block)
        valid = seg["mask"]
        if from_start:
            assert (np.diff(valid.astype(int), axis=1) <= 0).all()
        else:
            assert (np.diff(valid.astype(int), axis=1) >= 0).all() and valid[:, -1].all()
        # consecutive valid blocks are consecutive frames of one episode
        v = seg["obs"][:, :, 0, 0, 0].astype(int)
        both = valid[:, 1:] & valid[:, :-1]
        assert (np.diff(v, axis=1)[both] == 1).all()


def test_episode_spans_follow_the_ring_after_eviction():
    replay = Replay(8)
    for t in range(6):  # episode 0: rows 0-5, then episode 1: 4 rows; capacity 8 evicts the first two rows
        replay.add(obs=np.full((1, 1, 1), t, np.uint8), action=np.int64(0), reward=0.0, terminated=t == 5,
                   truncated=False, is_first=t == 0)
    for t in range(4):
        replay.add(obs=np.full((1, 1, 1), 50 + t, np.uint8), action=np.int64(0), reward=0.0, terminated=False,
                   truncated=False, is_first=t == 0)
    assert I.episode_spans(replay).tolist() == [[0, 3], [4, 3]]
    seg = I.sample_segments(replay, I.episode_spans(replay), 50, 1, True)
    assert set(seg["obs"][:, 0, 0, 0, 0].tolist()) <= {2, 3, 4, 50, 51, 52}


# Actor-critic ----------------------------------------------------------------------------------
def test_lambda_returns_on_a_four_step_toy_with_an_end():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    ends = torch.tensor([[False, True, False, False]])  # the step from s_1 ends the episode
    g = I.lambda_returns(rewards, values, ends, gamma=0.9, lambda_=0.5)
    # G_3 = V_3 = 40;  G_2 = 3 + 0.9 (0.5·40 + 0.5·40) = 39;  G_1 = 2 (ended);  G_0 = 1 + 0.9 (0.5·20 + 0.5·2) = 10.9
    np.testing.assert_allclose(g[0].numpy(), [10.9, 2.0, 39.0, 40.0], rtol=1e-6)


def test_actor_critic_loss_by_hand_uses_steps_before_the_last_and_a_detached_baseline():
    logits = torch.zeros(1, 3, 2, requires_grad=True)  # uniform policy over 2 actions
    values = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    traj = dict(logits=logits, value=values, action=torch.tensor([[0, 1, 1]]), reward=torch.tensor([[1.0, 0.0, 5.0]]),
                end=torch.zeros(1, 3, dtype=torch.bool))
    loss, m = I.actor_critic_loss(traj, gamma=1.0, lambda_=1.0, entropy_weight=0.0)
    # G = [1 + 0 + 3, 0 + 3] = [4, 3];  advantages [3, 1];  log π = ln 0.5
    np.testing.assert_allclose(float(m["actor_loss"]), -np.log(0.5) * (3 + 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(m["value_loss"]), ((4 - 1) ** 2 + (3 - 2) ** 2) / 2, rtol=1e-6)
    g_logits, g_values = torch.autograd.grad(loss, [logits, values])
    assert g_logits[0, 2].abs().sum() == 0 and g_values[0, 2] == 0  # the last step only bootstraps
    np.testing.assert_allclose(g_values[0, :2].numpy(), [-(4 - 1), -(3 - 2)], rtol=1e-6)  # no policy term in V's grad



def test_actor_critic_cnn_keeps_the_official_1024_features_and_takes_12x12_frames():
    assert I.ActorCritic(3, 64, 4).lstm.input_size == 4 * 4 * 64  # official: four conv+pool layers, 64 -> 4
    assert I.ActorCritic(4, 16, 3).lstm.input_size == 4 * 4 * 64
    ac = I.ActorCritic(4, 12, 3)  # 12 -> 6 -> 3
    assert ac.lstm.input_size == 3 * 3 * 64
    logits, value, _ = ac(torch.rand(2, 4, 12, 12), ac.initial(2, "cpu"))
    assert logits.shape == (2, 3) and value.shape == (2,)

def test_burn_in_padding_leaves_the_lstm_state_untouched():
    torch.manual_seed(0)
    ac = I.ActorCritic(3, 16, 4)
    state = (torch.randn(2, 512), torch.randn(2, 512))
    _, _, new = ac(torch.rand(2, 3, 16, 16), state, mask=torch.tensor([False, True]))
    torch.testing.assert_close(new[0][0], state[0][0])
    torch.testing.assert_close(new[1][0], state[1][0])
    assert not torch.allclose(new[0][1], state[0][1])


def test_dream_env_samples_the_same_with_and_without_the_cache_and_restarts_when_the_context_is_full():
    torch.manual_seed(0)
    args = tiny_args(max_blocks=3)
    tok, wm = I.Tokenizer(3, args).eval(), I.WorldModel(16, 3, args).eval()
    frames = torch.rand(2, 3, 16, 16)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        env = I.DreamEnv(tok, wm, use_cache=use_cache)
        out = [env.reset(frames)]
        for t in range(4):  # 16 + 4·17 tokens > 51: restarts from the current frame on the way
            obs, reward, end = env.step(torch.tensor([t % 3, 1]))
            out += [obs, reward, end.float()]
        runs.append(out)
        assert env.seq.shape[1] <= wm.max_tokens
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_imagination_pairs_each_action_with_the_frame_it_was_chosen_on():
    torch.manual_seed(0)
    args = tiny_args()
    tok, wm, ac = I.Tokenizer(3, args).eval(), I.WorldModel(16, 3, args).eval(), I.ActorCritic(3, 16, 3)
    batch = dict(frames=torch.rand(2, 3, 3, 16, 16), mask=torch.tensor([[False, True, True], [True, True, True]]))
    traj = I.imagine(tok, wm, ac, batch, horizon=3)
    assert traj["frames"].shape == (2, 3, 3, 16, 16) and traj["action"].shape == (2, 3)
    # frame 0 is the last real frame through the tokenizer; the policy at step 0 saw it
    torch.testing.assert_close(traj["frames"][:, 0], tok.encode_decode(batch["frames"][:, -1]))
    state = ac.initial(2, "cpu")
    with torch.no_grad():
        burn = tok.encode_decode(batch["frames"][:, :-1])
        for t in range(2):
            _, _, state = ac(burn[:, t], state, batch["mask"][:, t])
        logits, value, _ = ac(traj["frames"][:, 0], state)
    torch.testing.assert_close(traj["logits"][:, 0].detach(), logits)
    torch.testing.assert_close(traj["value"][:, 0].detach(), value)


# Smoke runs of the real script ---------------------------------------------------------------------
def test_smoke_run_on_pong_writes_logs_video_checkpoint_and_resumes(tmp_path):
    flags = [*TINY, "--env-id", "ALE/Pong-v5", "--actor-critic-learning-rate", "3e-5"]
    out = run_script(SCRIPT, [*flags, "--total-timesteps", "160"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "16 tokens/frame" in out.stdout and "no perceptual loss" in out.stdout
    run_dir = only_run_dir(tmp_path)
    acc = events(run_dir)
    for tag in ("tokenizer/reconstruction_loss", "world_model/obs_loss", "world_model/token_accuracy",
                "losses/actor_loss", "losses/value_loss", "perf/actor_critic_update_ms", "charts/SPS",
                "eval/episodic_return"):
        assert tag in acc.Tags()["scalars"], (tag, acc.Tags()["scalars"])
    assert "media/openloop" in acc.Tags()["images"]
    changed = [e.value for e in acc.Scalars("tokenizer/tokens_changed")]
    assert len(changed) == 2 and all(0 <= v <= 1 for v in changed)  # one per epoch (both) the tokenizer trained
    ckpt = checkpoint(run_dir)
    assert ckpt["global_step"] == 160 and ckpt["epoch"] == 3 and ckpt["updates"] == 2 * (2 + 2) + 2  # epoch 2 adds the AC
    lr = {k: ckpt[f"{k}_opt"]["param_groups"][0]["lr"] for k in ("actor_critic", "world_model")}
    assert lr == dict(actor_critic=3e-5, world_model=I.Args().learning_rate)  # only the actor-critic's lr is given
    check_resume_doubles_the_run(SCRIPT, flags, 160, tmp_path, run_dir)
    out = run_script(SCRIPT, [*TINY, "--env-id", "ALE/Pong-v5", "--embed", "32", "--resume", run_dir], tmp_path)
    assert out.returncode != 0 and "does not fit the one these settings build" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_kill_and_resume_loses_nothing(tmp_path):
    args = [*TINY, "--env-id", "MinAtar/Breakout-v1", "--eval-episodes", "0"]
    run_dir, ckpt, episodes = kill_and_resume(SCRIPT, args, tmp_path)
    assert checkpoint(run_dir)["global_step"] == ckpt["global_step"] + 20


def test_bad_inputs_get_one_sentence(tmp_path, monkeypatch, capsys):
    for extra, words in ((["--env-id", "CartPole-v1"], "no pixel observations"),
                         (["--env-id", "CarRacing-v3"], "needs a Discrete action space"),
                         (["--env-id", "MinAtar/Breakout-v1", "--resolution", "8"], "--resolution 8 must hold"),
                         (["--env-id", "MinAtar/Breakout-v1", "--reconstruction", "l2"], "must be l1 or bernoulli"),
                         (["--env-id", "MinAtar/Breakout-v1", "--encoder", "vit"], "must be taming or patch"),
                         (["--env-id", "MinAtar/Breakout-v1", "--perceptual-weights", "w.pt"], "needs --reconstruction l1"),
                         (["--env-id", "MinAtar/Breakout-v1", "--resume", str(tmp_path / "nope")], "Cannot resume")):
        code, told = stop_in_process(I, [*TINY, *extra], tmp_path, monkeypatch, capsys)
        assert code != 0 and words in told, told


def test_causal_attention_with_dropout_has_the_plain_attention_as_its_mean():
    # The CPU's written-out path (dropout on the probabilities, rescaled by 1/(1 - p)) and the fused call CUDA
    # takes both average to causal attention without dropout; 4,000 independent draws along the batch axis.
    q, k, v = (torch.randn(1, 2, 5, 4).expand(4000, -1, -1, -1) for _ in range(3))
    plain = I.causal_attention(q[:1], k[:1], v[:1], 0.0)[0]
    written_out = I.causal_attention(q, k, v, 0.5).mean(0)
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.5).mean(0)
    assert torch.allclose(written_out, plain, atol=0.08) and torch.allclose(fused, plain, atol=0.08)
    assert not torch.allclose(I.causal_attention(q[:2], k[:2], v[:2], 0.5)[0], plain, atol=0.08)  # dropout is on


def test_group_norm_in_the_input_dtype_matches_the_plain_group_norm():
    # the CPU's bf16 group norm (no casts to fp32 and back) against autocast's own fp32 one, which CUDA runs
    norm = I.norm(64)
    norm.weight.data.normal_(), norm.bias.data.normal_()
    x = torch.randn(2, 64, 8, 8) * 3 + 1
    torch.testing.assert_close(norm(x), F.group_norm(x, 32, norm.weight, norm.bias, 1e-6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, plain = norm(x.bfloat16()), torch.nn.GroupNorm.forward(norm, x.bfloat16())
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), plain.float(), atol=0.05, rtol=0.02)
