"""Videos a person can see: episodes enlarged and side by side, written as H.264 mp4 (PyAV)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np

VIDEO_SIZE = 256  # pixels: frames are enlarged to this height (nearest neighbour)


def side_by_side(episodes: list[list[np.ndarray]], height: int = VIDEO_SIZE) -> np.ndarray:
    """(T, height, k * width, 3) uint8: k episodes next to each other, enlarged by an integer factor
    (nearest neighbour) to about `height` pixels; an episode that ended holds its last frame."""
    length = max(len(frames) for frames in episodes)
    scale = max(1, height // episodes[0][0].shape[0])
    clips = []
    for frames in episodes:
        clip = np.stack(frames + [frames[-1]] * (length - len(frames)))
        clips.append(clip.repeat(scale, axis=1).repeat(scale, axis=2))
    return np.concatenate(clips, axis=2)


def write_mp4(path: Path, video: np.ndarray, fps: int = 20) -> None:
    """An H.264 mp4 of (T, H, W, 3) uint8 frames (through PyAV); H and W are padded to even sizes."""
    pad = ((0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0))
    iio.imwrite(path, np.pad(video, pad), plugin="pyav", codec="libx264", fps=fps)
