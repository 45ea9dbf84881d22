"""Plot any scalar tags of a run's TensorBoard events against the environment step, one panel per tag.

    python benchmarks/plot_scalars.py benchmarks/runs/<run> benchmarks/iris_minatar_tokens.png \
        tokenizer/reconstruction_loss world_model/token_accuracy --title "IRIS small, MinAtar Breakout"
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("tags", nargs="+")
    p.add_argument("--title", default="")
    opt = p.parse_args()
    acc = EventAccumulator(opt.run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    fig, axes = plt.subplots(1, len(opt.tags), figsize=(4.5 * len(opt.tags), 3.5), squeeze=False)
    for ax, tag in zip(axes[0], opt.tags):
        events = acc.Scalars(tag)
        ax.plot([e.step for e in events], [e.value for e in events], marker=".")
        ax.set_title(tag)
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    fig.suptitle(opt.title)
    fig.tight_layout()
    fig.savefig(opt.out, dpi=100)
    print(f"wrote {opt.out}")


if __name__ == "__main__":
    main()
