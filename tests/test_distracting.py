"""DMC with video backgrounds: the blue-dominance mask, the procedural and folder sources, the env."""

import imageio.v3 as iio
import numpy as np
import pytest

from wm.envs.distracting import (
    DistractingDMCEnv,
    ProceduralSource,
    VideoFolderSource,
    background_mask,
    replace_background,
)


def test_mask_replaces_exactly_the_blue_dominant_pixels():
    frame = np.array(
        [[[10, 10, 200], [200, 10, 10], [100, 100, 100]], [[10, 200, 200], [250, 10, 251], [0, 0, 1]]], np.uint8
    )
    expected = np.array([[True, False, False], [False, True, True]])  # ties with green or red are kept
    np.testing.assert_array_equal(background_mask(frame), expected)
    background = np.full_like(frame, 7)
    out = replace_background(frame, background)
    np.testing.assert_array_equal(out[expected], background[expected])
    np.testing.assert_array_equal(out[~expected], frame[~expected])


def test_procedural_source_is_deterministic_busy_and_moving():
    def frames(seed, episode_seed=0, n=3):
        episode = ProceduralSource(seed, image_size=32).episode(np.random.default_rng(episode_seed))
        return np.stack([next(episode) for _ in range(n)])

    clip = frames(3)
    assert clip.shape == (3, 32, 32, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, frames(3))
    assert not np.array_equal(clip, frames(4)) and not np.array_equal(clip, frames(3, episode_seed=1))
    assert (clip[0] != clip[1]).any() and (clip[1] != clip[2]).any()
    blue = np.mean(background_mask(clip))
    assert 0.1 < blue < 0.9  # both blue-dominant and other content
    assert clip.std() > 30  # busy, not flat


def _write_clips(root):
    """train/: a 3-frame GIF and a 2-frame folder of PNGs; eval/: a 2-frame GIF. Solid colours, which
    GIF's palette keeps exactly."""
    colours = {
        "train/a.gif": [(255, 0, 0), (0, 255, 0), (0, 0, 255)],
        "train/b": [(255, 255, 0), (0, 255, 255)],
        "eval/c.gif": [(255, 0, 255), (255, 255, 255)],
    }
    for name, clip in colours.items():
        frames = np.broadcast_to(np.array(clip, np.uint8)[:, None, None], (len(clip), 12, 20, 3))
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".gif":
            iio.imwrite(path, frames, loop=0)
        else:
            path.mkdir()
            for i, frame in enumerate(frames):
                iio.imwrite(path / f"{i:03d}.png", frame)
    return {split: [clip for name, clip in colours.items() if name.startswith(split)] for split in ("train", "eval")}


def test_video_folder_source_reads_splits_separately(tmp_path):
    colours = _write_clips(tmp_path)
    for split in ("train", "eval"):
        source = VideoFolderSource(tmp_path, split, image_size=16)
        clips = [[tuple(frame[0, 0]) for frame in clip] for clip in source.clips]
        assert clips == [[tuple(c) for c in clip] for clip in colours[split]]
        assert all(clip.shape[1:] == (16, 16, 3) and clip.dtype == np.uint8 for clip in source.clips)
        episode = source.episode(np.random.default_rng(0))
        played = [tuple(next(episode)[0, 0]) for _ in range(5)]
        clip = next(clip for clip in clips if played[0] in clip)  # a whole clip, looping from its start frame
        start = clip.index(played[0])
        assert played == [clip[(start + i) % len(clip)] for i in range(5)]
    with pytest.raises(FileNotFoundError, match="train"):
        VideoFolderSource(tmp_path / "missing")


def test_video_folder_source_reads_mp4(tmp_path):
    """Real video files through PyAV: flat-colour frames survive the codec nearly unchanged."""
    levels = np.arange(8) * 30
    frames = np.repeat(levels[:, None, None, None], 32, 1).repeat(32, 2).repeat(3, 3).astype(np.uint8)
    for split in ("train", "eval"):
        (tmp_path / split).mkdir()
        iio.imwrite(tmp_path / split / "clip.mp4", frames, plugin="pyav", codec="mpeg4", fps=10)
    (clip,) = VideoFolderSource(tmp_path, "train", image_size=16).clips
    assert clip.shape == (8, 16, 16, 3) and clip.dtype == np.uint8
    np.testing.assert_allclose(clip.reshape(8, -1).mean(1), levels, atol=6)


def test_env_replaces_only_the_background_and_the_video_advances():
    env = DistractingDMCEnv("cartpole", "swingup", action_repeat=2)
    first = env.reset(seed=0)[0]["image"]
    np.testing.assert_array_equal(first, env.reset(seed=0)[0]["image"])
    frames = []
    for _ in range(3):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        image, clean = obs["image"], env._render()  # the undistracted render of the same state
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and not terminated
        mask = background_mask(clean)
        assert mask.mean() > 0.5  # the sky and floor
        np.testing.assert_array_equal(image[~mask], clean[~mask])
        assert (image[mask] != clean[mask]).any(-1).mean() > 0.9
        frames.append((image, mask))
    for (a, mask_a), (b, mask_b) in zip(frames, frames[1:]):
        both = mask_a & mask_b
        assert (a[both] != b[both]).any(-1).mean() > 0.5  # the video moved on
    env.close()


def test_env_sources_and_splits(tmp_path):
    _write_clips(tmp_path)
    env = DistractingDMCEnv("cartpole", "swingup", video_dir=tmp_path, split="eval", image_size=16)
    image = env.reset(seed=0)[0]["image"]
    clean = env._render()
    assert {tuple(p) for p in image[background_mask(clean)]} <= {(255, 0, 255), (255, 255, 255)}
    train, test = (DistractingDMCEnv("cartpole", "swingup", split=split) for split in ("train", "eval"))
    assert not np.array_equal(train.reset(seed=0)[0]["image"], test.reset(seed=0)[0]["image"])
    with pytest.raises(ValueError, match="pixels"):
        DistractingDMCEnv("cartpole", "swingup", source=ProceduralSource(image_size=32))
    with pytest.raises(ValueError, match="split"):
        DistractingDMCEnv("cartpole", "swingup", split="test")
