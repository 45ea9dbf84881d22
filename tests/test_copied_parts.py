"""Parts that several algorithm files each carry as their own copy (CONVENTIONS §1): the Gaussian RSSM of
planet.py and dreamer_v1.py, and the conv decoder they share with dreamer_v2.py. The same tests run
against every copy."""

import dataclasses

import numpy as np
import pytest
import torch
from gymnasium import spaces

import tests.helpers  # noqa: F401  (puts algos/ on the path)
import dreamer_v1  # noqa: E402
import dreamer_v2  # noqa: E402
import planet  # noqa: E402

MODULES = [pytest.param(planet, id="planet"), pytest.param(dreamer_v1, id="dreamer_v1")]
CONV_MODULES = [*MODULES, pytest.param(dreamer_v2, id="dreamer_v2")]


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
