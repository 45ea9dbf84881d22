"""Every script checks its numeric flags before anything starts: one sentence naming the flag, the value and the
allowed range, exit code 2 (as tyro's own errors), no run directory and no environment built.

Each case goes through the script's own entry point in this process (tests/helpers.py stop_in_process). A run
directory or an environment made before the check fails the case at once instead of starting a run.
"""

import importlib
import sys

import pytest

from tests.helpers import stop_in_process  # (and algos/ on the path)

# script: (valid flags, [(flag, value, how the value is printed, the allowed range as the sentence gives it)])
CASES = {
    "dreamer_v2": (["--env-id", "CartPole-v1"], [
        ("--batch-size", "0", "0", "≥ 1"),
        ("--kl-balance", "1.2", "1.2", "in [0, 1]"),
        ("--gamma", "1.01", "1.01", "in (0, 1]"),
        ("--mlp-layers", "0", "0", "≥ 1"),
        ("--weight-decay", "1", "1.0", "in [0, 1)"),
        ("--log-every", "0", "0", "≥ 1"),
        ("--video-every", "-1", "-1", "≥ 0 (0: off)"),
    ]),
    "dreamer_v1": (["--env-id", "Pendulum-v1"], [
        ("--horizon", "0", "0", "≥ 1"),
        ("--gamma", "0", "0.0", "in (0, 1]"),
        ("--lambda_", "1.5", "1.5", "in [0, 1]"),
        ("--batch-size", "0", "0", "≥ 1"),
        ("--expl-amount", "-0.1", "-0.1", "≥ 0"),
        ("--checkpoint-every", "0", "0", "≥ 1"),
    ]),
    "planet": (["--env-id", "Pendulum-v1"], [
        ("--planning-horizon", "0", "0", "≥ 1"),
        ("--top-candidates", "0", "0", "in 1 … --candidates (300)"),
        ("--top-candidates", "301", "301", "in 1 … --candidates (300)"),
        ("--bit-depth", "9", "9", "in 1 … 8"),
        ("--model-lr", "-1", "-1.0", "> 0"),
        ("--batch-length", "0", "0", "≥ 1"),
    ]),
    "plan2explore": (["--env-id", "Pendulum-v1"], [
        ("--ensemble-size", "1", "1", "≥ 2 (disagreement is a variance over the ensemble)"),
        ("--horizon", "0", "0", "≥ 1"),
        ("--adapt-steps", "-1", "-1", "≥ 0 (0: off)"),
        ("--intrinsic-scale", "0", "0.0", "> 0"),
        ("--batch-length", "0", "0", "≥ 1"),
    ]),
    "tdmpc": (["--env-id", "Pendulum-v1"], [
        ("--batch-size", "0", "0", "≥ 1"),
        ("--horizon", "0", "0", "≥ 1"),
        ("--num-elites", "257", "257", "in 1 … --num-samples (256)"),
        ("--discount", "1.5", "1.5", "in (0, 1]"),
        ("--lr", "0", "0.0", "> 0"),
        ("--per-beta", "2", "2.0", "in [0, 1]"),
        ("--total-timesteps", "0", "0", "≥ 1"),
    ]),
    "iris": (["--env-id", "MinAtar/Breakout-v1"], [
        ("--total-timesteps", "-5", "-5", "≥ 1"),
        ("--horizon", "1", "1", "≥ 2"),
        ("--epsilon", "2", "2.0", "in [0, 1]"),
        ("--dropout", "1", "1.0", "in [0, 1)"),
        ("--embed", "17", "17", "a multiple of --heads (4)"),
        ("--tokenizer-learning-rate", "0", "0.0", "> 0 (or not given: --learning-rate)"),
    ]),
    "dino_wm": (["--env-id", "Wall-v0", "--preset", "small"], [
        ("--elites", "1", "1", "in 2 … --samples (100)"),
        ("--execute-steps", "6", "6", "in 1 … --horizon (5)"),
        ("--image-size", "30", "30", "a positive multiple of the 14-px patch"),
        ("--dropout", "1", "1.0", "in [0, 1)"),
        ("--train-steps", "-1", "-1", "≥ 0 (0: off)"),
        ("--num-hist", "0", "0", "≥ 1"),
    ]),
    "world_models_carracing": (["--preset", "small"], [
        ("--population", "1", "1", "≥ 2 (CMA-ES ranks candidates)"),
        ("--z-size", "0", "0", "≥ 1"),
        ("--vae-lr", "0", "0.0", "> 0"),
        ("--num-workers", "-1", "-1", "≥ 0 (0: one per CPU core)"),
        ("--temperature", "0", "0.0", "> 0"),
    ]),
}


def not_yet(*_, **__):
    raise AssertionError("an environment was built before the flags were checked")


@pytest.mark.parametrize("name, flag, value, shown, allowed",
                         [(n, *case) for n, (_, cases) in CASES.items() for case in cases])
def test_a_flag_out_of_range_stops_with_one_sentence_before_anything_starts(name, flag, value, shown, allowed,
                                                                             tmp_path, monkeypatch, capsys):
    module = importlib.import_module(name)
    for attr in ("make_env", "make_goal_env"):
        if hasattr(module, attr):
            monkeypatch.setattr(module, attr, not_yet)
    code, told = stop_in_process(module, [*CASES[name][0], flag, value], tmp_path, monkeypatch, capsys)
    assert code == 2 and told == f"error: {flag} {shown} is out of range: it must be {allowed}.", told


@pytest.mark.parametrize("name", list(CASES))
def test_the_valid_flags_of_each_case_pass_the_checks(name, monkeypatch):
    # the cases above fail because of their one flag: the same command without it passes check_args
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [module.__file__, *CASES[name][0]])
    module.check_args(module.parse_args(module.Args, module.PRESETS, module.default_preset))
