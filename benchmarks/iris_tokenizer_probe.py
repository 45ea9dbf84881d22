"""What an IRIS run's tokenizer keeps of its frames: distinct tokens per grid position, how many tokens each
distinct patch content gets, and, for binary frames (MinAtar), the share of each channel's 'on' pixels that the
reconstruction gets wrong. Frames are replay rows the tokenizer trains on (episodes' last observations excluded).

    python benchmarks/iris_tokenizer_probe.py benchmarks/runs/<MinAtar run>

A tokenizer whose tokens do not change from frame to frame at a position has collapsed: the world model then
predicts its tokens perfectly (world_model/token_accuracy → 1) while imagining nothing that moves.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import iris as I  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.replay import Replay  # noqa: E402


def main():
    run = sys.argv[1]
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["args"].items()}
    args = dataclasses.replace(I.Args(), **saved)
    replay = Replay(10**7)
    replay.load(os.path.join(run, "episodes"))
    # every 7th of the rows a block can hold: not an episode's last observation, which no segment contains
    # (iris.episode_spans), so the tokenizer never trains on it (checked: ~99% of its ball pixels come out wrong)
    last = np.append(replay.data["is_first"][1:replay.size], True)
    obs = torch.as_tensor(replay.data["obs"][:replay.size][~last][::7][:1000])
    tok = I.Tokenizer(obs.shape[1], args)
    tok.load_state_dict(ckpt["tokenizer"])
    tok.eval()
    frames = I.to_frames(obs, args.resolution)
    with torch.no_grad():
        tokens = tok.encode(frames)[2]
        recon = tok.encode_decode(frames)
    per_position = [tokens[:, i].unique().numel() for i in range(tokens.shape[1])]
    print(f"{len(frames)} frames, epoch {ckpt['epoch']}: {tokens.unique().numel()} distinct tokens; per position {per_position}")
    # codes per distinct content: 1 when equal patches always get the same token (what the world model can predict)
    n, c, size, side = *frames.shape[:2], frames.shape[-1], tok.side
    patch = size // side
    patches = frames.reshape(n, c, side, patch, side, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, side * side, -1)
    codes = []
    for i in range(side * side):
        seen = {}
        for p_, t in zip(patches[:, i].numpy(), tokens[:, i].tolist()):
            seen.setdefault(p_.tobytes(), set()).add(t)
        codes.append(sum(len(v) for v in seen.values()) / len(seen))
    print(f"tokens per distinct patch content, mean over positions: {sum(codes) / len(codes):.1f} "
          f"(per position {[round(x, 1) for x in codes]})")
    print(f"L1 error in [0, 1]: {(recon - frames).abs().mean():.4f}")
    on = frames > 0.5
    wrong = (recon > 0.5) != on
    for c in range(frames.shape[1]):
        if on[:, c].any():
            print(f"channel {c}: {on[:, c].float().mean():.3%} of pixels on, {(wrong[:, c] & on[:, c]).sum() / on[:, c].sum():.1%} of them wrong")


if __name__ == "__main__":
    main()
