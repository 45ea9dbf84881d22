"""Every script on CUDA: smoke runs in fp32 and bf16, SIGTERM and resume on the GPU, checkpoints carried from the CPU
to the GPU and back, and one world-model loss computed on both devices from the same weights and batch.

Skipped where torch sees no CUDA device. `benchmarks/gpu_check.py --device cpu` sets WM_CUDA_TESTS_ON_CPU=1 to
run these same tests with the CPU standing in for the GPU, so that they are known to work before a GPU runs them.
"""

import copy
import dataclasses
import importlib
import os

import numpy as np
import pytest
import torch
from gymnasium import spaces

from benchmarks.timing import random_batch
from tests import (
    test_dino_wm, test_dreamer_v1, test_dreamer_v2, test_iris, test_plan2explore, test_planet, test_tdmpc,
    test_world_models_carracing,
)
from tests.helpers import checkpoint, only_run_dir, run_script, script, start_and_terminate

ON_CPU = os.environ.get("WM_CUDA_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
pytestmark = pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                                reason="no CUDA device (torch.cuda.is_available() is False)")


def on_cpu(flags: list) -> list:
    return [*[f for f in flags if f != "--no-cuda"], "--no-cuda"]


def on_gpu(flags: list) -> list:  # the scripts' --cuda is on by default
    return on_cpu(flags) if ON_CPU else [f for f in flags if f != "--no-cuda"]


def steps(more: int):
    """Flags that continue a run `more` environment steps past its checkpoint."""
    return lambda ckpt: ["--total-timesteps", str(ckpt["global_step"] + more)]


# script: (its smoke flags, first run, continuation past a checkpoint, a run long enough to be stopped,
#          the counter that must grow on every resume)
CASES = {
    "dreamer_v2.py": (test_dreamer_v2.TINY + ["--env-id", "ALE/Pong-v5", "--action-repeat", "4", "--grayscale",
                                              "--eval-episodes", "0"],
                      ["--total-timesteps", "480"], steps(240), ["--total-timesteps", "1000000"], "updates"),
    "dreamer_v1.py": (test_dreamer_v1.TINY + ["--env-id", "dm_control/cartpole-swingup-v0", "--action-repeat", "8",
                                              "--log-every", "400"],
                      ["--total-timesteps", "1200"], steps(400), ["--total-timesteps", "1000000"], "updates"),
    "planet.py": (test_planet.TINY + ["--env-id", "dm_control/cartpole-swingup-v0", "--log-every", "1000"],
                  ["--total-timesteps", "2000"], steps(1000), ["--total-timesteps", "1000000"], "updates"),
    "plan2explore.py": (test_plan2explore.TINY + ["--env-id", "dm_control/cartpole-swingup-v0", "--action-repeat", "8",
                                                  "--adapt-steps", "0", "--log-every", "500"],
                        ["--total-timesteps", "1000"], steps(500), ["--total-timesteps", "1000000"], "updates"),
    "tdmpc.py": (test_tdmpc.TINY + ["--env-id", "dm_control/cartpole-swingup-v0", "--log-every", "400"],
                 ["--total-timesteps", "1600"], steps(800), ["--total-timesteps", "1000000"], "updates"),
    "iris.py": (test_iris.TINY + ["--env-id", "ALE/Pong-v5", "--eval-episodes", "0"],
                ["--total-timesteps", "160"], steps(160), ["--total-timesteps", "1000000"], "updates"),
    "dino_wm.py": (test_dino_wm.TINY + ["--env-id", "Wall-v0", "--checkpoint-every", "2"],
                   [], lambda ckpt: ["--train-steps", str(ckpt["updates"] + 2)], ["--train-steps", "100000"], "updates"),
    "world_models_carracing.py": (test_world_models_carracing.TINY, [],
                                  lambda ckpt: ["--stage", "vae", "--vae-epochs", str(ckpt["state"]["vae_epoch"] + 1)],
                                  ["--vae-epochs", "1000"], "vae_updates"),
}


def counter(run_dir: str, key: str) -> int:
    ckpt = checkpoint(run_dir)
    return ckpt["state"][key] if "state" in ckpt else ckpt[key]


def resumed(name: str, flags: list, run_dir: str, cwd, device_flags, bf16: bool = False) -> str:
    """Resume `run_dir` past its checkpoint with the script's continuation flags; the run must go on training."""
    _, _, more, _, key = CASES[name]
    before = counter(run_dir, key)
    out = run_script(script(name), [*device_flags(flags), *more(checkpoint(run_dir)), "--resume", run_dir,
                                    *(["--bf16"] if bf16 else [])], cwd, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert counter(run_dir, key) > before and only_run_dir(cwd) == run_dir
    return out.stdout


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_checkpoint_resumes_on_cuda_in_bf16(name, tmp_path):
    flags, first, _, _, _ = CASES[name]
    out = run_script(script(name), [*on_cpu(flags), *first], tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    stdout = resumed(name, flags, only_run_dir(tmp_path), tmp_path, on_gpu, bf16=True)
    assert f"device: {DEVICE}" in stdout, stdout


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_run_stopped_on_cuda_resumes_on_cuda_then_on_the_cpu(name, tmp_path):
    flags, _, _, long, _ = CASES[name]
    code, out = start_and_terminate(script(name), [*on_gpu(flags), *long], tmp_path, settle=3.0)
    assert code == 130 and f"device: {DEVICE}" in out, out
    run_dir = only_run_dir(tmp_path)
    resumed(name, flags, run_dir, tmp_path, on_gpu)
    stdout = resumed(name, flags, run_dir, tmp_path, on_cpu)
    if not ON_CPU:  # a checkpoint written on CUDA holds CUDA random states, which a CPU run skips with a line
        assert "CUDA random states are skipped" in stdout, stdout


def test_dreamer_v2_with_torch_deterministic_repeats_itself_exactly(tmp_path):
    # --torch-deterministic: deterministic cuDNN and cuBLAS kernels (CUBLAS_WORKSPACE_CONFIG), so two runs of the
    # same seed end with the same weights, bit for bit
    flags, first, *_ = CASES["dreamer_v2.py"]
    weights = []
    for i in range(2):
        out = run_script(script("dreamer_v2.py"), [*on_gpu(flags), *first, "--torch-deterministic", "--exp-name",
                                                   f"deterministic{i}"], tmp_path, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        (run_dir,) = [d for d in os.listdir(tmp_path / "runs") if f"deterministic{i}" in d]
        weights.append(checkpoint(str(tmp_path / "runs" / run_dir))["wm"])
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


# One world-model loss on the CPU and on CUDA: same weights, same batch, the same random draws (made on the CPU),
# TF32 off. fp32 results then differ only by the order of floating-point sums.
@pytest.fixture
def same_draws_on_every_device(monkeypatch):
    """torch.rand / rand_like / randn_like drawn on the CPU from one generator, then moved: CUDA's generator makes
    other numbers from the same seed. Call the returned function with a seed before each computation."""
    rand, randn, state = torch.rand, torch.randn, {"g": torch.Generator().manual_seed(0)}
    monkeypatch.setattr(torch, "rand", lambda *size, device=None, dtype=None, **_: rand(
        *size, generator=state["g"], dtype=dtype).to(device or "cpu"))
    monkeypatch.setattr(torch, "rand_like", lambda x, **_: rand(x.shape, generator=state["g"], dtype=x.dtype).to(x.device))
    monkeypatch.setattr(torch, "randn_like", lambda x, **_: randn(x.shape, generator=state["g"], dtype=x.dtype).to(x.device))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    with torch.backends.cudnn.flags(allow_tf32=False):
        yield lambda seed: state.update(g=torch.Generator().manual_seed(seed))
    torch.set_float32_matmul_precision(precision)


def assert_same_losses(cpu: dict, gpu: dict):
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        torch.testing.assert_close(gpu[k].float().cpu(), cpu[k].float(), rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["dreamer_v2", "dreamer_v1", "planet", "plan2explore"])
def test_rssm_world_model_loss_is_the_same_on_cuda(name, same_draws_on_every_device):
    module = importlib.import_module(name)
    sizes = dict(deter=16, hidden=16, stoch=4, cnn_depth=4, free_nats=0.0)
    sizes.update({k: 16 for k in ("units", "mlp_units") if hasattr(module.Args, k)})
    args = dataclasses.replace(module.Args(), **sizes)
    obs_space = spaces.Box(0, 255, (3, 64, 64), np.uint8)
    torch.manual_seed(0)
    wm = module.WorldModel(obs_space, 2, args)
    batch = random_batch(obs_space, 2, False, 2, 6)
    results = []
    for device, model in (("cpu", wm), (DEVICE, copy.deepcopy(wm).to(DEVICE))):
        same_draws_on_every_device(1)
        out = module.world_model_loss(model, {k: v.to(device) for k, v in batch.items()}, args)
        results.append({"loss": out[0], **{k: v for k, v in out[-1].items() if torch.is_tensor(v)}})
    assert_same_losses(*results)


def test_iris_tokenizer_and_world_model_losses_are_the_same_on_cuda(same_draws_on_every_device):
    import iris as I
    args = test_iris.tiny_args()
    torch.manual_seed(0)
    tokenizer = I.Tokenizer(3, args)
    wm = I.WorldModel(tokenizer.tokens_per_frame, 3, args)
    rng = np.random.default_rng(0)
    data = dict(obs=rng.integers(0, 256, (2, 4, 3, 16, 16), dtype=np.uint8), action=rng.integers(0, 3, (2, 4)),
                reward=rng.standard_normal((2, 4)), end=np.zeros((2, 4), bool), mask=np.ones((2, 4), bool))
    results = []
    for device, (tok, model) in (("cpu", (tokenizer, wm)), (DEVICE, (copy.deepcopy(tokenizer).to(DEVICE),
                                                                    copy.deepcopy(wm).to(DEVICE)))):
        batch = I.to_batch(data, args.resolution, device)
        tok_loss, tok_metrics = I.tokenizer_loss(tok, batch["frames"][:, 0])
        wm_loss, wm_metrics = I.world_model_loss(tok, model, batch)
        results.append({"tokenizer": tok_loss, "world_model": wm_loss, **tok_metrics, **wm_metrics})
    assert_same_losses(*results)


def test_dino_wm_prediction_loss_is_the_same_on_cuda(same_draws_on_every_device):
    import dino_wm as D
    same_draws_on_every_device(1)
    wm, args = test_dino_wm.tiny_model()
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, args.num_hist + 1, 3, 28, 28), dtype=torch.uint8, generator=gen)
    proprio = torch.randn(2, args.num_hist + 1, 3, generator=gen)
    action = torch.randn(2, args.num_hist + 1, 2 * args.frameskip, generator=gen)
    results = []
    for device, model in (("cpu", wm), (DEVICE, copy.deepcopy(wm).to(DEVICE))):
        x = [t.to(device) for t in (frames, proprio, action)]
        loss, metrics = D.prediction_loss(model, model.latent(model.encode_frames(x[0]), x[1], x[2]))
        results.append({"loss": loss, **metrics})
    assert_same_losses(*results)
