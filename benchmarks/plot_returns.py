"""Plot episodic return against environment steps (and wall-clock minutes) from a run's TensorBoard events.

    python benchmarks/plot_returns.py runs/<run_dir> benchmarks/dreamer_v2_cartpole.png --title "DreamerV2, CartPole-v1"

Also prints the mean return of the last 10 episodes finished within --minutes of wall-clock time.
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
    p.add_argument("--title", default="")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--random", type=float, default=None, help="the random policy's mean return, drawn as a line")
    opt = p.parse_args()
    acc = EventAccumulator(opt.run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("charts/episodic_return")
    start = acc.Scalars("charts/episodic_return")[0].wall_time
    first = min(e.wall_time for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag))
    start = min(start, first)
    steps = np.array([e.step for e in events])
    returns = np.array([e.value for e in events])
    minutes = np.array([(e.wall_time - start) / 60 for e in events])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, x, label in [(axes[0], steps, "environment steps"), (axes[1], minutes, "wall-clock minutes (2-core CPU)")]:
        ax.plot(x, returns, ".", alpha=0.4, label="episode")
        smooth = np.convolve(returns, np.ones(10) / 10, mode="valid") if len(returns) >= 10 else returns
        ax.plot(x[len(x) - len(smooth):], smooth, label="mean of last 10")
        if opt.random is not None:
            ax.axhline(opt.random, color="gray", ls="--", label="random policy")
        ax.set_xlabel(label)
        ax.set_ylabel("episodic return")
    axes[1].axvline(opt.minutes, color="red", ls=":", label=f"{opt.minutes:.0f} min")
    axes[1].legend(fontsize=8)
    fig.suptitle(opt.title)
    fig.tight_layout()
    fig.savefig(opt.out, dpi=100)
    within = returns[minutes <= opt.minutes]
    print(f"{len(returns)} episodes, {steps[-1]} steps, {minutes[-1]:.1f} min; mean of the last 10 within "
          f"{opt.minutes:.0f} min: {within[-10:].mean():.1f} (at step {steps[minutes <= opt.minutes][-1]})")
    if "eval/episodic_return" in acc.Tags()["scalars"]:
        ev = [e.value for e in acc.Scalars("eval/episodic_return")]
        print(f"eval: mean {np.mean(ev):.1f} over {len(ev)} greedy episodes")


if __name__ == "__main__":
    main()
