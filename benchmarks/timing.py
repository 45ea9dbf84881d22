"""What the throughput scripts share: their command line, a random batch shaped like an env's data,
process CPU time per call, and peak resident memory."""

import argparse
import resource
import time

import torch

from common.run import keep_freed_memory


def parse(default_preset: str, default_env: str) -> argparse.Namespace:
    """--preset, --env-id, --repeats, --warmup (calls not counted), --threads (set here), --bf16. Freed memory is
    kept for reuse, as the scripts keep it on a CPU."""
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default=default_preset)
    p.add_argument("--env-id", default=default_env)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    opt = p.parse_args()
    torch.set_num_threads(opt.threads)
    keep_freed_memory()  # as the scripts do on a CPU (common/run.py's choose_device)
    return opt


def random_batch(obs_space, action_dim: int, discrete: bool, B: int, T: int) -> dict:
    """A (B, T) replay chunk of random data: uint8 frames or float vectors, one-hot or [-1, 1] actions,
    about 1% terminations and resets."""
    shape = obs_space.shape
    obs = torch.randint(0, 256, (B, T, *shape), dtype=torch.uint8) if obs_space.dtype == "uint8" else torch.randn(B, T, *shape)
    action = torch.nn.functional.one_hot(torch.randint(0, action_dim, (B, T)), action_dim).float() if discrete \
        else torch.rand(B, T, action_dim) * 2 - 1
    return dict(obs=obs, action=action, reward=torch.randn(B, T), terminated=torch.rand(B, T) < 0.01,
                is_first=torch.rand(B, T) < 0.01)


def cpu_seconds(fn, calls: int) -> list[float]:
    """Process CPU time of each of `calls` calls of fn(i)."""
    times = []
    for i in range(calls):
        t = time.process_time()
        fn(i)
        times.append(time.process_time() - t)
    return times


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
