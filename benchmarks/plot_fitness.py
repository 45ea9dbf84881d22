"""Plot CMA-ES fitness (best, mean and worst candidate per generation) from a world_models_carracing.py run's
TensorBoard events, with the evaluation of the best candidate and a random floor drawn as lines.

    python benchmarks/plot_fitness.py benchmarks/runs/<run> benchmarks/world_models_fitness.png --random -54
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--random", type=float, default=None, help="the random policy's mean return over full episodes")
    p.add_argument("--title", default="World Models (small preset), CarRacing-v3, 2-core CPU")
    opt = p.parse_args()
    acc = EventAccumulator(opt.run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("best", "mean", "worst"):
        events = acc.Scalars(f"charts/fitness_{name}")
        ax.plot([e.step for e in events], [e.value for e in events], label=f"{name} candidate (fitness rollouts)")
    if "eval/episodic_return" in acc.Tags()["scalars"]:
        ev = [e.value for e in acc.Scalars("eval/episodic_return")]
        ax.axhline(np.mean(ev), color="C3", ls="--", label=f"best candidate, {len(ev)} full episodes: {np.mean(ev):.0f}")
    if opt.random is not None:
        ax.axhline(opt.random, color="gray", ls=":", label=f"random policy, full episodes: {opt.random:.0f}")
    ax.set(xlabel="CMA-ES generation", ylabel="return", title=opt.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(opt.out, dpi=100)


if __name__ == "__main__":
    main()
