"""Parts that several algorithm files each carry as their own copy (CONVENTIONS §1): the Gaussian RSSM of
planet.py, dreamer_v1.py and plan2explore.py, the conv decoder they share with dreamer_v2.py, and Dreamer's
V_λ. The same tests run against every copy."""

import dataclasses

import numpy as np
import pytest
import torch
from gymnasium import spaces

import tests.helpers  # noqa: F401  (puts algos/ on the path)
import dreamer_v1  # noqa: E402
import dreamer_v2  # noqa: E402
import plan2explore  # noqa: E402
import planet  # noqa: E402

MODULES = [pytest.param(planet, id="planet"), pytest.param(dreamer_v1, id="dreamer_v1"),
           pytest.param(plan2explore, id="plan2explore")]
CONV_MODULES = [*MODULES, pytest.param(dreamer_v2, id="dreamer_v2")]
LAMBDA_MODULES = [pytest.param(dreamer_v1, id="dreamer_v1"), pytest.param(plan2explore, id="plan2explore")]


def tiny_wm(module, action_dim=2):
    args = dataclasses.replace(module.Args(), deter=16, hidden=16, stoch=4, cnn_depth=4, free_nats=0.0)
    if hasattr(args, "units"):
        args = dataclasses.replace(args, units=16)
    torch.manual_seed(0)
    return module.WorldModel(spaces.Box(-1, 1, (5,), np.float32), action_dim, args), args


@pytest.mark.parametrize("module", MODULES)
def test_state_and_previous_action_reset_where_is_first_is_set(module):
    wm, args = tiny_wm(module)
    torch.manual_seed(2)
    embed = torch.randn(1, 5, wm.rssm.obs_out[0].in_features - args.deter)
    action = torch.randn(1, 5, 2) + 3  # large, non-zero previous actions
    post, prior = wm.rssm.observe(embed, action, torch.tensor([[True, False, False, True, False]]))
    # where is_first, h_t = f(0, 0, 0): the same as the very first step, whatever came before
    fresh = wm.rssm.cell(wm.rssm.img_in(torch.zeros(1, args.stoch + 2)), torch.zeros(1, args.deter))
    torch.testing.assert_close(prior["deter"][:, 0], fresh)
    torch.testing.assert_close(prior["deter"][:, 3], fresh)
    assert not torch.allclose(prior["deter"][:, 2], fresh)
    no_reset, _ = wm.rssm.observe(embed, action, torch.tensor([[True, False, False, False, False]]))
    assert not torch.allclose(no_reset["deter"][:, 3], fresh)


@pytest.mark.parametrize("module", MODULES)
def test_state_is_reparameterised_with_the_minimum_std(module):
    wm, args = tiny_wm(module)
    state = wm.rssm.initial(3, "cpu")
    action = torch.zeros(3, 2, requires_grad=True)
    prior = wm.rssm.img_step(state, action)
    assert prior["std"].min() >= args.min_std
    (grad,) = torch.autograd.grad(prior["stoch"].sum(), action)
    assert grad.abs().sum() > 0  # the sample carries gradients back to the action (needed by Dreamer's actor)


@pytest.mark.parametrize("module", MODULES)
def test_kl_gaussian_matches_torch(module):
    torch.manual_seed(0)
    mq, mp, sq, sp = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 3) + 0.1, torch.rand(4, 3) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp)).sum(-1)
    torch.testing.assert_close(module.kl_gaussian(mq, sq, mp, sp), ref)


@pytest.mark.parametrize("module", MODULES)
def test_gru_cell_computes_torch_gru_cell(module):
    torch.manual_seed(0)
    ours, ref = module.GRUCell(5, 7), torch.nn.GRUCell(5, 7)
    with torch.no_grad():
        ref.weight_ih.copy_(ours.inp.weight)
        ref.bias_ih.copy_(ours.inp.bias)
        ref.weight_hh.copy_(ours.hid.weight)
        ref.bias_hh.copy_(ours.hid.bias)
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    torch.testing.assert_close(ours(x, h), ref(x, h))


@pytest.mark.parametrize("module", CONV_MODULES)
def test_conv_decoder_first_layer_as_a_matmul_equals_the_transposed_conv(module):
    torch.manual_seed(0)
    dec = module.ConvDecoder(10, 3, 4)
    feat = torch.randn(2, 10)
    as_conv = dec.net(dec.inp(feat).view(-1, 32 * 4, 1, 1))
    torch.testing.assert_close(dec(feat), as_conv, rtol=1e-4, atol=1e-5)
    assert dec(feat).shape == (2, 3, 64, 64)


# V_λ, Eq. 6, in dreamer_v1.py and plan2explore.py --------------------------------------------------------------------------------------------
def eq6(reward, value, discount, lambda_, tau):
    """The paper's Eq. 6 literally: (1 − λ) Σ_{n=1}^{H−1} λ^{n−1} V_N^n + λ^{H−1} V_N^H over the k-step estimates
    V_N^k(s_τ) = Σ_{n=τ}^{h−1} (Π discounts) r_n + (Π discounts) v(s_h), h = min(τ + k, H)."""
    H = len(reward)

    def v_n(k):
        h, total, scale = min(tau + k, H - 1), 0.0, 1.0
        for n in range(tau, h):
            total += scale * reward[n]
            scale *= discount[n]
        return total + scale * value[h]

    steps = H - 1 - tau
    return (1 - lambda_) * sum(lambda_ ** (n - 1) * v_n(n) for n in range(1, steps)) + lambda_ ** (steps - 1) * v_n(steps)


@pytest.mark.parametrize("discount, expected", [
    # γ = 0.9 everywhere: V_3 = 3 + 0.9·40 = 39;  V_2 = 2 + 0.9 (0.5·30 + 0.5·39) = 33.05;
    #                     V_1 = 1 + 0.9 (0.5·20 + 0.5·33.05) = 24.8725
    ([0.9, 0.9, 0.9, 0.9], [24.8725, 33.05, 39.0]),
    # s_2 predicted terminal (γ̂_2 = 0): V_2 = r_2 = 2;  V_1 = 1 + 0.9 (0.5·20 + 0.5·2) = 10.9
    ([0.9, 0.0, 0.9, 0.9], [10.9, 2.0, 39.0]),
])
@pytest.mark.parametrize("module", LAMBDA_MODULES)
def test_lambda_return_by_hand_on_a_4_step_toy(module, discount, expected):
    reward, value = [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]  # over s_1 … s_4
    t = lambda x: torch.tensor(x)[:, None]  # noqa: E731
    returns = module.lambda_return(t(reward), t(value), t(discount), lambda_=0.5)[:, 0]
    np.testing.assert_allclose(returns.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(returns.numpy(), [eq6(reward, value, discount, 0.5, tau) for tau in range(3)], rtol=1e-6)
