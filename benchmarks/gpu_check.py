"""The one command to run on a GPU machine: the CUDA tests, then each algorithm's paper-size update (and planner step
where it plans) timed in fp32 (TF32 matmuls, as the scripts run) and bf16, with peak GPU memory.

    python benchmarks/gpu_check.py                        # a GPU machine: sized for 8 minutes on one H100
    python benchmarks/gpu_check.py --device cpu --tiny    # the same steps on a CPU, small presets (under 3 minutes)

1. tests/test_cuda.py, split by script over --jobs parallel pytest processes (on the CPU, with
   WM_CUDA_TESTS_ON_CPU=1, the CPU stands in for the GPU; --tiny runs only DreamerV2's runs and the loss checks).
2. For every algorithm, the operations of its benchmarks/<algo>_throughput.py (`operations()`, the scripts' real
   functions on random data) at the paper preset (--tiny: the small one): `warmup` calls, then the median wall time
   of `repeats` calls, each ended by torch.cuda.synchronize(); peak memory is torch.cuda.max_memory_allocated over
   those calls. Nothing else may run on the GPU meanwhile.
The table goes to stdout and to --out (default benchmarks/out/gpu_check_<device>.md). Exit code 1 if a test failed.
"""

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "algos"))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

# algorithm: (throughput module, paper preset and env id, small preset and env id)
ALGORITHMS = {
    "dreamer_v2": ("atari", "ALE/Pong-v5", "small", "CartPole-v1"),
    "dreamer_v1": ("dmc", "dm_control/cheetah-run-v0", "small", "Pendulum-v1"),
    "planet": ("dmc", "dm_control/cheetah-run-v0", "small", "Pendulum-v1"),
    "plan2explore": ("dmc", "dm_control/cheetah-run-v0", "small", "Pendulum-v1"),
    "tdmpc": ("dmc", "dm_control/cheetah-run-v0", "small", "Pendulum-v1"),
    "iris": ("atari", "ALE/Pong-v5", "small", "MinAtar/Breakout-v1"),
    "dino_wm": ("paper", "PointMaze_UMaze-v3", "small", "Wall-v0"),
    "world_models": ("paper", "CarRacing-v3", "paper", "CarRacing-v3"),
}
# pytest -k expressions that split tests/test_cuda.py by script (every test there names one of them)
TEST_GROUPS = ["dreamer_v2", "dreamer_v1", "planet", "plan2explore", "tdmpc", "iris", "dino_wm", "world_models"]


def run_tests(device: str, tiny: bool, jobs: int) -> bool:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"WM_CUDA_TESTS_ON_CPU": "1"} if device == "cpu" else {})}
    groups = ["same_on_cuda or dreamer_v2"] if tiny else TEST_GROUPS
    pending, ok = list(groups), True
    running = []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < jobs:
            k = pending.pop(0)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k", k]
            running.append((k, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)))
        k, proc = running.pop(0)
        out, _ = proc.communicate()
        last = out.strip().splitlines()[-1] if out.strip() else "(no output)"
        print(f"  tests -k '{k}': {last}", flush=True)
        if proc.returncode != 0:
            ok = False
            print(out[-6000:], flush=True)
    print(f"  tests took {time.time() - t0:.0f} s", flush=True)
    return ok


def time_operations(name: str, preset: str, env_id: str, bf16: bool, device: str, warmup: int, repeats: int) -> dict:
    """{operation: (median ms, peak GiB or None)} for one algorithm at one precision."""
    module = importlib.import_module(f"benchmarks.{name}_throughput")
    cuda = device == "cuda"
    if name == "world_models":
        built = module.operations(bf16, device)
    elif name == "tdmpc":
        built = module.operations(preset, env_id, bf16, device, rows=100_000 if cuda else 5_000)
    else:
        built = module.operations(preset, env_id, bf16, device)
    ops = built[1]  # (description, {name: fn(i)}, ...)
    results = {}
    for op, fn in ops.items():
        for i in range(warmup):
            fn(i)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(warmup, warmup + repeats):
            t = time.perf_counter()
            fn(i)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        results[op] = (1000 * float(np.median(times)), torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    del built, ops
    if cuda:
        torch.cuda.empty_cache()
    return results


def fmt_ms(ms: float) -> str:
    return f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="small presets and one repeat (a dry run of every step)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per operation (default 3, --tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, --tiny 1)")
    p.add_argument("--jobs", type=int, default=None, help="parallel pytest processes (default 8 on CUDA, 1 on a CPU)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="time only these algorithms")
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/out/gpu_check_<device>.md)")
    opt = p.parse_args()
    if opt.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu --tiny for a dry run.")
    repeats = opt.repeats or (1 if opt.tiny else 3)
    warmup = opt.warmup if opt.warmup is not None else (1 if opt.tiny else 2)
    jobs = opt.jobs or (8 if opt.device == "cuda" else 1)
    started = time.time()

    if opt.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device_name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
        torch.set_float32_matmul_precision("high")  # as the scripts run fp32 on CUDA (common/run.py choose_device)
    else:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
        device_name = f"CPU: {model}, {os.cpu_count()} cores"
    header = (f"gpu_check {datetime.date.today()}: {device_name}; torch {torch.__version__}; "
              f"{'tiny (small presets)' if opt.tiny else 'paper presets'}, median of {repeats} after {warmup} warm-up")
    print(header, flush=True)

    tests_ok = True
    if not opt.skip_tests:
        print("1. tests/test_cuda.py", flush=True)
        tests_ok = run_tests(opt.device, opt.tiny, jobs)

    print("2. timings", flush=True)
    rows = []
    for name, (preset, env_id, small, small_env) in ALGORITHMS.items():
        if opt.only and name not in opt.only:
            continue
        preset, env_id = (small, small_env) if opt.tiny else (preset, env_id)
        fp32 = time_operations(name, preset, env_id, False, opt.device, warmup, repeats)
        bf16 = time_operations(name, preset, env_id, True, opt.device, warmup, repeats)
        for op in fp32:
            (a, mem_a), (b, mem_b) = fp32[op], bf16[op]
            mem = "-" if mem_a is None else f"{mem_a:.2f} / {mem_b:.2f}"
            rows.append(f"| {name} | {preset} | {op} | {fmt_ms(a)} | {fmt_ms(b)} | {a / b:.2f} | {mem} |")
            print(rows[-1], flush=True)

    table = "\n".join([header, "", "| algorithm | preset | operation | fp32/TF32 ms | bf16 ms | fp32/bf16 | "
                       "peak GiB fp32 / bf16 |", "|---|---|---|---:|---:|---:|---:|", *rows, "",
                       f"tests: {'passed' if tests_ok else 'FAILED'}; total {time.time() - started:.0f} s"])
    out = opt.out or os.path.join(ROOT, "benchmarks", "out", f"gpu_check_{opt.device}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print(f"written to {out}")
    sys.exit(0 if tests_ok else 1)


if __name__ == "__main__":
    main()
