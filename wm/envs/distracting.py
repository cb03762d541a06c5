"""DMC with natural video backgrounds (docs/algorithm.md §3; MuDreamer, after DBC): every pixel of the rendered
frame where blue > green and blue > red (the suite's sky and floor) shows a video frame instead, so
the agent must learn to ignore a busy, moving, task-irrelevant background.

Each episode plays a random clip from a random start frame, one frame per observation (i.e. per agent
step, whatever the action repeat, as DBC renders once per agent step). The clips come from a
VideoFolderSource (a user's videos, e.g. Kinetics "driving car") or, by default, a ProceduralSource.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image

from wm.envs.dmc import DMCEnv

SPLITS = ("train", "eval")


def background_mask(frame: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of a uint8 RGB frame where blue > green and blue > red."""
    red, green, blue = np.moveaxis(frame, -1, 0)
    return (blue > green) & (blue > red)


def replace_background(frame: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The frame with its background_mask pixels taken from `background` (same shape)."""
    return np.where(background_mask(frame)[..., None], background, frame)


class ProceduralSource:
    """The default background: coloured noise with a power-law spectrum like natural images' (amplitude
    ~ frequency^-1.5, slightly smoother than their 1/f so it reads as shapes at 64x64, not pixel noise),
    which scrolls and evolves over time. Frames are computed on the fly (no memory), deterministic
    given the seed.

    Each of `num_clips` clips has random phases per frequency and channel (independent channels give
    both blue-dominant and other regions), a scroll velocity and per-frequency phase drifts.
    """

    def __init__(self, seed: int = 0, image_size: int = 64, num_clips: int = 16) -> None:
        rng = np.random.default_rng(seed)
        self.image_size = image_size
        shape = (num_clips, image_size, image_size // 2 + 1, 3)
        self._fy = np.fft.fftfreq(image_size)[:, None, None]  # cycles per pixel, as rfft2 lays them out
        self._fx = np.fft.rfftfreq(image_size)[None, :, None]
        frequency = np.hypot(self._fy, self._fx)
        amplitude = np.divide(1.0, frequency**1.5, out=np.zeros_like(frequency), where=frequency > 0)
        self._spectra = amplitude * np.exp(2j * np.pi * rng.random(shape))
        self._velocity = rng.uniform(-1.0, 1.0, (num_clips, 2))  # pixels per frame, (y, x)
        self._drift = rng.normal(0.0, 0.03, shape)  # cycles per frame

    def frame(self, clip: int, t: int) -> np.ndarray:
        """Frame t of a clip, (S, S, 3) uint8."""
        vy, vx = self._velocity[clip]
        phase = self._drift[clip] * t - (self._fy * vy + self._fx * vx) * t  # drift, then shift theorem
        spectrum = self._spectra[clip] * np.exp(2j * np.pi * phase)
        image = np.fft.irfft2(spectrum, s=(self.image_size,) * 2, axes=(0, 1))
        image = (image - image.mean((0, 1))) / image.std((0, 1))
        return np.clip(128 + 64 * image, 0, 255).astype(np.uint8)

    def episode(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """The frames of a random clip from a random start frame."""
        clip = int(rng.integers(len(self._spectra)))
        return (self.frame(clip, t) for t in itertools.count(int(rng.integers(10_000))))


class VideoFolderSource:
    """The clips under `directory/<split>/`, split "train" or "eval", so evaluation can use unseen
    videos. A clip is a video file (GIF, or mp4/avi/... read through PyAV, a dependency) or a folder
    of image frames in name order. Frames are resized and kept in memory as uint8.
    """

    VIDEO_SUFFIXES = (".gif", ".mp4", ".avi", ".mov", ".mkv", ".webm")
    FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")

    def __init__(self, directory: str | Path, split: str = "train", image_size: int = 64) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = Path(directory) / split
        paths = sorted(p for p in root.glob("*") if p.is_dir() or p.suffix.lower() in self.VIDEO_SUFFIXES)
        if not paths:
            raise FileNotFoundError(
                f"no clips in {root}: put video files or folders of frames in {directory}/train and "
                f"{directory}/eval"
            )
        self.image_size = image_size
        self.clips = [self._load(path) for path in paths]

    def _load(self, path: Path) -> np.ndarray:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in self.FRAME_SUFFIXES)
            frames = (iio.imread(p) for p in files)
        else:
            frames = iio.imiter(path)
        size = (self.image_size, self.image_size)
        resized = (Image.fromarray(f).convert("RGB").resize(size, Image.Resampling.BILINEAR) for f in frames)
        return np.stack([np.asarray(f) for f in resized])

    def episode(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """The frames of a random clip from a random start frame, looping at its end."""
        clip = self.clips[rng.integers(len(self.clips))]
        return (clip[t % len(clip)] for t in itertools.count(int(rng.integers(len(clip)))))


class DistractingDMCEnv(DMCEnv):
    """A DMCEnv whose background shows `source`, by default the videos in `video_dir` if given, else
    ProceduralSource (seed 0 for the train split, 1 for eval). Clips are drawn from the env's
    np_random, so reset(seed=...) makes the backgrounds reproducible too."""

    def __init__(
        self,
        domain: str,
        task: str,
        source: ProceduralSource | VideoFolderSource | None = None,
        video_dir: str | Path | None = None,
        split: str = "train",
        image_size: int = 64,
        camera: int | None = None,
        action_repeat: int = 1,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if source is not None and video_dir is not None:
            raise ValueError("give either a source or a video_dir, not both")
        super().__init__(domain, task, image_size, camera, action_repeat)
        if source is None:
            source = (
                VideoFolderSource(video_dir, split, image_size)
                if video_dir is not None
                else ProceduralSource(SPLITS.index(split), image_size)
            )
        if source.image_size != image_size:
            raise ValueError(f"source frames are {source.image_size} pixels, the env's {image_size}")
        self.source = source
        self._background: Iterator[np.ndarray] | None = None

    def reset(self, *, seed=None, options=None):
        self._background = None  # the next observation starts a clip, drawn after np_random is seeded
        return super().reset(seed=seed, options=options)

    def _observe(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        if self._background is None:
            self._background = self.source.episode(self.np_random)
        return super()._observe(replace_background(frame, next(self._background)))
