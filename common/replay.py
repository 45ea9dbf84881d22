"""Episode storage and chunk sampling, one format for every algorithm, online or offline.

An episode is a dict of equal-length arrays, one row per observation the environment returned.
This table is THE alignment every algorithm in this project relies on:

    index t       :  0        1        2        3 (last)
    obs[t]        :  o_0      o_1      o_2      o_3     returned by reset (t=0) or by the t-th step
    action[t]     :  0        a_0      a_1      a_2     the action whose step returned obs[t]; zeros at a reset
    reward[t]     :  0        r_1      r_2      r_3     the reward returned together with obs[t]; 0 at a reset
    terminated[t] :  F        F        F        T/F     obs[t] is terminal: nothing follows it, value 0
    truncated[t]  :  F        F        F        T/F     the episode was cut at obs[t] (time limit): obs[t] still has a value
    is_first[t]   :  T        F        F        F       obs[t] came from reset()

So the agent that sees obs[t] chooses action[t+1], and reward[t+1] is what that choice earned.
An episode of N environment steps has N + 1 rows.

Storage: a flat ring of `capacity` rows (FIFO eviction, images kept uint8, arrays allocated lazily
so resident memory follows what is held). Each finished episode is written atomically (temp file,
fsync, rename) as one compressed `.npz` under `directory`; `save_partial()` writes the unfinished
one (called at every checkpoint), so a killed run loses at most the steps since its last
checkpoint. `load()` reads a directory back (resume, offline datasets); leftover temp files are
ignored. `sample(B, T)` returns chunks drawn uniformly over every start whose T rows are held,
the newest included; chunks may cross episode boundaries, and `is_first` marks every reset
inside them.
"""

import os
import re

import numpy as np

KEYS = ("obs", "action", "reward", "terminated", "truncated", "is_first")
_EPISODE_FILE = re.compile(r"^(\d{6})-(\d+)(p?)\.npz$")
_PARTIAL = "partial.npz"


def save_episode(path: str, episode: dict) -> None:
    """Write one episode atomically: a reader sees the whole file or none of it."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **episode)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_episode(path: str) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


class Replay:
    """Flat FIFO store of environment rows (see the module docstring for the alignment)."""

    def __init__(self, capacity: int, directory: str | None = None, seed: int = 0):
        self.capacity = int(capacity)
        self.directory = directory
        self.rng = np.random.default_rng(seed)
        self.data: dict[str, np.ndarray] = {}
        self.next = 0  # physical index of the next row to write
        self.size = 0  # rows held
        self.episode_len = 0  # rows of the unfinished episode (the newest rows)
        self.num_episodes = 0  # finished episodes written (names the next file)
        if directory:
            os.makedirs(directory, exist_ok=True)

    def __len__(self) -> int:
        return self.size

    def _write_rows(self, rows: dict) -> None:
        """Append rows given as arrays with a leading time axis, evicting the oldest past capacity."""
        if not self.data:
            for k, v in rows.items():
                self.data[k] = np.empty((self.capacity, *v.shape[1:]), v.dtype)  # untouched pages cost nothing
        n = len(rows["obs"])
        keep = min(n, self.capacity)
        idx = (self.next + n - keep + np.arange(keep)) % self.capacity
        for k, arr in self.data.items():
            arr[idx] = rows[k][n - keep:]
        self.next = (self.next + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def add(self, obs, action, reward, terminated, truncated, is_first, **extra) -> None:
        """Append one row; when it ends the episode (terminated or truncated), write the episode file."""
        if is_first and self.episode_len:
            self._finish(complete=False)  # the previous episode stopped without a terminal flag
        row = dict(obs=obs, action=action, reward=np.float32(reward), terminated=bool(terminated),
                   truncated=bool(truncated), is_first=bool(is_first), **extra)
        self._write_rows({k: np.asarray(v)[None] for k, v in row.items()})
        self.episode_len += 1
        if terminated or truncated:
            self._finish(complete=True)

    def _newest(self, n: int) -> dict:
        """The newest n rows in time order, as copies."""
        n = min(n, self.size)
        idx = (self.next - n + np.arange(n)) % self.capacity
        return {k: arr[idx] for k, arr in self.data.items()}

    def _finish(self, complete: bool) -> None:
        if self.directory:
            episode = self._newest(self.episode_len)
            name = f"{self.num_episodes:06d}-{len(episode['obs'])}{'' if complete else 'p'}.npz"
            save_episode(os.path.join(self.directory, name), episode)
            partial = os.path.join(self.directory, _PARTIAL)
            if os.path.exists(partial):
                os.remove(partial)
        self.num_episodes += 1
        self.episode_len = 0

    def save_partial(self) -> None:
        """Write the unfinished episode so that a kill loses nothing collected before this call."""
        if self.directory and self.episode_len:
            save_episode(os.path.join(self.directory, _PARTIAL), self._newest(self.episode_len))

    def load(self, directory: str | None = None) -> int:
        """Read every episode file of a directory in order (oldest evicted past capacity); returns rows loaded.

        An unfinished episode left by a stopped run ('partial.npz') is kept under a finished name,
        so that the resumed run's own partial episode cannot overwrite it.
        """
        directory = directory or self.directory
        if not directory or not os.path.isdir(directory):
            raise FileNotFoundError(f"No episode directory at '{directory}'.")
        names = sorted(n for n in os.listdir(directory) if _EPISODE_FILE.match(n))
        index = int(_EPISODE_FILE.match(names[-1]).group(1)) + 1 if names else 0
        partial = os.path.join(directory, _PARTIAL)
        if os.path.exists(partial):
            episode = load_episode(partial)
            name = f"{index:06d}-{len(episode['obs'])}p.npz"
            os.replace(partial, os.path.join(directory, name))
            names.append(name)
            index += 1
        rows = 0
        for name in names:
            episode = load_episode(os.path.join(directory, name))
            self._write_rows(episode)
            rows += len(episode["obs"])
        self.num_episodes = max(self.num_episodes, index)
        self.episode_len = 0
        return rows

    def sample(self, batch_size: int, length: int) -> dict:
        """Chunks of shape (B, T, ...), starts uniform over all fully-held windows."""
        if self.size < length:
            raise ValueError(f"Replay holds {self.size} rows, fewer than the chunk length {length}.")
        oldest = (self.next - self.size) % self.capacity
        starts = self.rng.integers(0, self.size - length + 1, size=batch_size)
        idx = (oldest + starts[:, None] + np.arange(length)[None]) % self.capacity
        return {k: arr[idx] for k, arr in self.data.items()}
