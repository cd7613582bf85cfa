"""The embedded video data set "motion": 14 classes told apart by how the objects MOVE.

Classes (``MOTION_CLASSES``): translation in 8 directions (east, north-east, ... on the
screen), rotation clockwise / counter-clockwise, expansion and contraction, oscillation
along a random axis, and a bouncing path (a random direction reflected once off a wall at a
random angle). Nothing else depends on the class: every clip draws, from its own
``np.random.default_rng([seed, split_id, class_id, index])``, ``NUM_OBJECTS`` textured
objects (each a random star-like blob with stripes, a checker or smooth noise in two random
colours, at a random place, orientation, size and speed, all moving with the class's
motion; later ones occlude earlier ones), a textured background (two random colours
blended by periodic 1/f noise, plus a faint fine texture) that drifts at a random slow
velocity, camera jitter (a random sub-pixel shake of the whole frame), and, in half of the
clips, an opaque bar that crosses the frame in a random direction, occluding the objects.
The world is a torus: an object wraps around the frame edges and its position in the
middle frame is uniform over the frame, so its position in ANY frame is uniform for every
class (a frame shows where the objects are, not where they go). Orientation is uniform at
every frame as well; the size at the middle frame has the same distribution for all classes
(expansion / contraction change it by the same factor either way around that frame). So a
single frame carries no class information; frame differences do.

Written as H.264 mp4 (PyAV, ``libx264``, ``yuv420p``, one thread for byte-identical
output) in the Kinetics layout that ``readers.KineticsDataset`` reads:
``root/{train,val,test}/<class>/<class>_<index>.mp4``, ``root/{train,val,test}.csv`` of
``<path> <label>`` lines (paths relative to ``root``, labels indexing ``MOTION_CLASSES``)
and ``root/pretrain.csv`` (the train clips as ``<path> 0 -1`` lines, VideoMAE V2's
pretraining list). Frames are rendered at 2x and box-filtered (antialiased).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from visionbench.data.cache import default_cache_dir, write_once
from visionbench.data.fields import smooth_noise
from visionbench.errors import ConfigError

GENERATOR_VERSION = 4
SUPERSAMPLE = 2
FPS = 15
CRF = 16  # x264 quality: near-lossless at these sizes
# One thread, and no macroblock-tree rate control: with it, x264's SIMD code gave different
# bytes for the same frames from one run to the next at these tiny sizes (2-4 macroblocks a
# row), depending on the state of the process; without it (or with no-asm) they are the same.
X264_OPTIONS = {"threads": "1", "preset": "medium", "x264-params": "mbtree=0"}
SPLITS = ("train", "val", "test")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

DIRECTIONS = ("e", "ne", "n", "nw", "w", "sw", "s", "se")
# sorted, so that a label is also the index of its class folder among the sorted folders
MOTION_CLASSES: list[str] = sorted(
    [f"translate_{d}" for d in DIRECTIONS]
    + ["rotate_cw", "rotate_ccw", "expand", "contract", "oscillate", "bounce"]
)

# Motion strengths, in output pixels (of a 32 px frame; scaled with the frame size) and
# radians per frame.
# translation, px / frame at 32 px. At 1 - 1.6 (version 2) the demo's video ViT (patch 8, 16
# frames at stride 2) trained from scratch (AdamW 1e-3, 40 epochs, 24 clips a class) stayed at
# chance; at 2 - 3 it reached 17 % (chance 7.1 %). The demo's fine-tune (layer decay 0.75,
# label smoothing, 30 epochs) stayed at chance with either, with one object a clip.
SPEED = (2.0, 3.0)
SPIN = (0.10, 0.18)  # rotation, rad / frame
ZOOM = (0.035, 0.055)  # expansion / contraction, log-size / frame (of 16-frame clips)
RADIUS = (0.15, 0.23)  # object radius at the middle frame, fraction of the frame
# objects a clip, each moving with the class's motion. With one (version 3) the demo's
# fine-tunes stayed at chance and a converged logistic regression on the random-init demo
# ViT's pooled features reached 13 % (140 test clips); with 6 (a frame about half
# covered), the fine-tunes reach about 30 % and that regression 21 - 23 % (420 test clips)
NUM_OBJECTS = 6
BACKGROUND_DRIFT = 0.3  # at most, px / frame at 32 px
JITTER = 0.3  # camera shake, std in px at 32 px
BACKGROUND_CONTRAST = 35.0  # std of the second background colour around the first
# amplitude of the background's fine texture (near-white noise). At 4 - 10 (version 3) it
# was about 2/3 of the variance inside an 8 x 8 background patch of a 32 px frame (the median
# patch), so VideoMAE's per-patch normalized target there was mostly noise; at 1 - 3, 15 %
FINE_TEXTURE = (1.0, 3.0)
OBJECT_CONTRAST = 70.0  # std of the object's second colour around its first
BAR_P = 0.5
BAR_WIDTH = (0.06, 0.12)  # fraction of the frame
BAR_SPEED = (0.5, 1.2)  # px / frame at 32 px


# ----------------------------------------------------------------------------- fields


def _shifted(field: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """``(T, n, n, C)``: a periodic ``(n, n, C)`` field moved by ``(dx, dy)`` pixels at each
    of ``T`` frames (a Fourier shift: sub-pixel and periodic)."""
    n = field.shape[0]
    spectrum = np.fft.rfft2(field, axes=(0, 1)).astype(np.complex64)
    fy, fx = np.fft.fftfreq(n), np.fft.rfftfreq(n)
    phase = np.exp(-2j * np.pi * (fx[None, None, :] * dx[:, None, None]
                                  + fy[None, :, None] * dy[:, None, None])).astype(np.complex64)
    return np.fft.irfft2(spectrum[None] * phase[..., None], s=(n, n), axes=(1, 2))


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, 3)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour whose luminance differs from the background's mean by >= 50 (the
    first of up to 30 draws that does, else the most different)."""
    best, gap = _colour(rng), -1.0
    for _ in range(30):
        colour = _colour(rng)
        diff = abs(_luma(colour) - _luma(background))
        if diff >= 50:
            return colour
        if diff > gap:
            best, gap = colour, diff
    return best


def _wrap(d: np.ndarray, n: float) -> np.ndarray:
    """Differences on a torus of size ``n``, in ``[-n/2, n/2)``."""
    return (d + n / 2) % n - n / 2


# ----------------------------------------------------------------------------- clip


def _path(class_name: str, rng: np.random.Generator, scale: float, t: np.ndarray
          ) -> np.ndarray:
    """The object's displacement (T, 2) in canvas px at times ``t`` (0 at the middle
    frame): a straight line for ``translate_*``; for ``oscillate`` a sine along a random
    axis (1 to 2 periods a clip, the speed of a translation at its peak); for ``bounce`` a
    straight line in a random direction reflected once, in the middle third of the clip, off
    a wall at a random angle; still for the other classes."""
    speed = rng.uniform(*SPEED) * scale
    if class_name.startswith("translate_"):
        k = DIRECTIONS.index(class_name.removeprefix("translate_"))
        angle = k * np.pi / 4
        return speed * np.array([np.cos(angle), -np.sin(angle)])[None] * t[:, None]  # y down
    if class_name not in ("oscillate", "bounce"):
        return np.zeros((len(t), 2))
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.array([np.cos(angle), np.sin(angle)])
    if class_name == "oscillate":
        omega = 2 * np.pi * rng.uniform(1.0, 2.0) / len(t)
        phase = rng.uniform(0, 2 * np.pi)
        return (speed / omega) * np.sin(omega * t + phase)[:, None] * axis[None]
    hit = rng.uniform(t[0] + len(t) / 3, t[-1] - len(t) / 3)  # the moment of the bounce
    wall = rng.uniform(0, 2 * np.pi)
    normal = np.array([np.cos(wall), np.sin(wall)])
    if axis @ normal > 0:
        normal = -normal  # the wall faces the object coming in
    after = axis - 2 * (axis @ normal) * normal
    before_hit = np.minimum(t, hit) - hit
    after_hit = np.maximum(t, hit) - hit
    return speed * (before_hit[:, None] * axis[None] + after_hit[:, None] * after[None])


def _motion(class_name: str, rng: np.random.Generator, num_frames: int
            ) -> tuple[float, float]:
    """(spin in rad / frame, zoom in log-size / frame)."""
    spin, zoom = 0.0, 0.0
    if class_name.startswith("rotate_"):
        # with y down, a positive angle turns clockwise on the screen
        spin = rng.uniform(*SPIN) * (1.0 if class_name == "rotate_cw" else -1.0)
    elif class_name in ("expand", "contract"):  # the same size change whatever the length
        zoom = rng.uniform(*ZOOM) * (1.0 if class_name == "expand" else -1.0)
        zoom *= 15.0 / (num_frames - 1)
    return spin, zoom


def _object_texture(rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A texture value in [0, 1] at object coordinates ``(a, b)`` (radius units)."""
    kind = rng.integers(3)
    freq = rng.uniform(0.6, 1.2) * 2 * np.pi
    if kind == 0:  # stripes
        beta = rng.uniform(0, np.pi)
        return 0.5 + 0.5 * np.sin(freq * (a * np.cos(beta) + b * np.sin(beta))
                                  + rng.uniform(0, 2 * np.pi))
    if kind == 1:  # checker, softened
        p1, p2 = rng.uniform(0, 2 * np.pi, 2)
        return 0.5 + 0.5 * np.tanh(3.0 * np.sin(freq * a + p1) * np.sin(freq * b + p2))
    grid = rng.uniform(0.0, 1.0, (6, 6))  # smooth noise: a bilinear lookup over [-1.5, 1.5]^2
    u = np.clip((a + 1.5) / 3.0 * 5, 0, 5 - 1e-6)
    v = np.clip((b + 1.5) / 3.0 * 5, 0, 5 - 1e-6)
    i, j = u.astype(np.int64), v.astype(np.int64)
    fu, fv = u - i, v - j
    return ((1 - fu) * (1 - fv) * grid[j, i] + fu * (1 - fv) * grid[j, i + 1]
            + (1 - fu) * fv * grid[j + 1, i] + fu * fv * grid[j + 1, i + 1])


def _draw_object(frames: np.ndarray, class_name: str, rng: np.random.Generator, scale: float,
                 t: np.ndarray, jitter: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                 background_mean: np.ndarray) -> np.ndarray:
    """One object of ``class_name``'s motion drawn over ``frames``: a star-like blob, its
    texture in its own coordinates."""
    n = xs.shape[0]
    num_frames = len(t)
    spin, zoom = _motion(class_name, rng, num_frames)
    path = _path(class_name, rng, scale, t)
    centre = rng.uniform(0, n, 2) + path + jitter  # (T, 2)
    angle = rng.uniform(0, 2 * np.pi) + spin * t  # (T,)
    radius = rng.uniform(*RADIUS) * n * np.exp(zoom * t)  # (T,)
    dx = _wrap(xs[None] - centre[:, 0, None, None], n)
    dy = _wrap(ys[None] - centre[:, 1, None, None], n)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    a = (cos * dx + sin * dy) / radius[:, None, None]  # object coordinates (radius units)
    b = (-sin * dx + cos * dy) / radius[:, None, None]
    r, phi = np.hypot(a, b), np.arctan2(b, a)
    outline = np.ones_like(phi)
    for m in (2, 3, 5):
        outline += rng.uniform(0.0, 0.22) * np.cos(m * phi + rng.uniform(0, 2 * np.pi))
    inside = r <= outline
    texture = _object_texture(rng, a, b)
    o0 = _object_colour(rng, background_mean)
    o1 = np.clip(o0 + rng.normal(0.0, OBJECT_CONTRAST, 3), 0, 255)
    obj = o0 + texture[..., None] * (o1 - o0)
    return np.where(inside[..., None], obj, frames)


def render_clip(class_name: str, image_size: int, num_frames: int,
                rng: np.random.Generator) -> np.ndarray:
    """``uint8 (num_frames, image_size, image_size, 3)``: one clip of ``class_name``."""
    if class_name not in MOTION_CLASSES:
        raise ConfigError(f"motion class: {class_name!r} (expected one of {MOTION_CLASSES})")
    n = image_size * SUPERSAMPLE
    scale = SUPERSAMPLE * image_size / 32.0  # canvas px per px of a 32 px frame
    t = np.arange(num_frames, dtype=np.float64) - (num_frames - 1) / 2  # 0 at the middle

    # camera: a random shake of everything, and a slow drift of the background
    jitter = rng.normal(0.0, JITTER * scale, (num_frames, 2))
    drift_angle = rng.uniform(0, 2 * np.pi)
    drift = rng.uniform(0, BACKGROUND_DRIFT) * scale * np.array(
        [np.cos(drift_angle), np.sin(drift_angle)])

    # background: two colours blended by periodic 1/f noise, plus a fainter texture
    mix = 1.0 / (1.0 + np.exp(-rng.uniform(1.0, 2.5) * smooth_noise(rng, n, 1.2)))
    fine = smooth_noise(rng, n, 0.6)
    c0 = _colour(rng)
    c1 = np.clip(c0 + rng.normal(0.0, BACKGROUND_CONTRAST, 3), 0, 255)
    background = c0 + mix[..., None] * (c1 - c0) + rng.uniform(*FINE_TEXTURE) * fine[..., None]
    shift = drift[None, :] * t[:, None] + jitter
    frames = _shifted(background, shift[:, 0], shift[:, 1])

    ys, xs = (np.mgrid[0:n, 0:n] + 0.5).astype(np.float64)
    background_mean = background.mean(axis=(0, 1))
    for _ in range(NUM_OBJECTS):
        frames = _draw_object(frames, class_name, rng, scale, t, jitter, xs, ys,
                              background_mean)

    # occlusion: an opaque bar crossing the frame along its normal
    if rng.random() < BAR_P:
        theta = rng.uniform(0, 2 * np.pi)
        normal = np.array([np.cos(theta), np.sin(theta)])
        width = rng.uniform(*BAR_WIDTH) * n
        offset = (rng.uniform(-0.5, 0.5) * n
                  + rng.uniform(*BAR_SPEED) * scale * t)  # (T,) along the normal
        proj = ((xs - n / 2)[None] - jitter[:, 0, None, None]) * normal[0] + (
            (ys - n / 2)[None] - jitter[:, 1, None, None]) * normal[1]
        bar = np.abs(proj - offset[:, None, None]) < width / 2
        frames = np.where(bar[..., None], _colour(rng), frames)

    frames = frames.reshape(num_frames, image_size, SUPERSAMPLE, image_size, SUPERSAMPLE, 3)
    return np.clip(np.rint(frames.mean(axis=(2, 4))), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- on disk


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)`` RGB -> the ``(3 H / 2, W)`` planes of yuv420p: ITU-R BT.601 in the
    limited range (what FFmpeg decodes H.264 back to RGB with by default), chroma averaged
    over 2 x 2 blocks: a conversion of our own, independent of swscale's version and
    options."""
    rgb = frame.astype(np.float64)
    h, w, _ = rgb.shape
    y = 16.0 + rgb @ np.array([65.481, 128.553, 24.966]) / 255.0
    cb = 128.0 + rgb @ np.array([-37.797, -74.203, 112.0]) / 255.0
    cr = 128.0 + rgb @ np.array([112.0, -93.786, -18.214]) / 255.0

    def half(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(h // 4, w)

    planes = np.concatenate([y, half(cb), half(cr)], axis=0)
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = FPS, crf: int = CRF) -> None:
    """``uint8 (T, H, W, 3)`` RGB frames as H.264 (libx264, yuv420p) in an mp4 file, written
    so that the same frames give the same bytes (``X264_OPTIONS``)."""
    import av

    t, h, w, _ = frames.shape
    if h % 4 or w % 2:
        raise ConfigError(f"video size {w}x{h}: expected a width divisible by 2 and a height "
                          "by 4 (yuv420p)")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=X264_OPTIONS | {"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            picture.pts = index
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def motion_root(image_size: int = 32, num_frames: int = 16, seed: int = 0,
                train_per_class: int = 30, val_per_class: int = 10, test_per_class: int = 10,
                cache_dir: str | Path | None = None) -> Path:
    """The cache folder of one parameter set, e.g. ``motion-v1-32px-16f-s0-n30-10-10``."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / (f"motion-v{GENERATOR_VERSION}-{image_size}px-{num_frames}f-s{seed}"
                   f"-n{train_per_class}-{val_per_class}-{test_per_class}")


def _params(image_size: int, num_frames: int, counts: dict[str, int], seed: int) -> dict:
    return {
        "generator": "motion",
        "version": GENERATOR_VERSION,
        "image_size": image_size,
        "num_frames": num_frames,
        "per_class": counts,
        "seed": seed,
        "fps": FPS,
        "crf": CRF,
        "x264": X264_OPTIONS,
        "classes": MOTION_CLASSES,
    }


def generate_motion_clips(root: str | Path, image_size: int = 32, num_frames: int = 16,
                          train_per_class: int = 30, val_per_class: int = 10,
                          test_per_class: int = 10, seed: int = 0) -> Path:
    """Write the motion data set to ``root`` (Kinetics layout) unless it is already there.

    Written once (``cache.write_once``): into a temporary sibling renamed to ``root`` when
    complete; a finished ``root`` of other parameters is a ``DataError``. A split with 0
    clips a class is left out (no folder, no csv).
    """
    if image_size < 8 or image_size % 4:
        raise ConfigError(f"motion clips: image_size {image_size} (expected a multiple of 4, "
                          ">= 8)")
    if num_frames < 2:
        raise ConfigError(f"motion clips: num_frames {num_frames} (expected at least 2)")
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    if any(c < 0 for c in counts.values()) or train_per_class < 1:
        raise ConfigError(f"motion clips: clips per class {counts} (expected train >= 1, "
                          "val and test >= 0)")

    def write(tmp: Path) -> None:
        total = sum(counts.values()) * len(MOTION_CLASSES)
        with tqdm(total=total, desc="motion clips", leave=False) as bar:
            for split, count in counts.items():
                if count == 0:
                    continue
                lines = []
                for class_id, name in enumerate(MOTION_CLASSES):
                    folder = tmp / split / name
                    folder.mkdir(parents=True)
                    for index in range(count):
                        rng = np.random.default_rng([seed, SPLIT_IDS[split], class_id, index])
                        clip = render_clip(name, image_size, num_frames, rng)
                        rel = f"{split}/{name}/{name}_{index:05d}.mp4"
                        write_mp4(tmp / rel, clip)
                        lines.append(f"{rel} {class_id}\n")
                        bar.update()
                (tmp / f"{split}.csv").write_text("".join(lines))
                if split == "train":
                    (tmp / "pretrain.csv").write_text(
                        "".join(f"{line.split()[0]} 0 -1\n" for line in lines))

    return write_once(root, _params(image_size, num_frames, counts, seed), "motion", write)


def prepare_motion_clips(image_size: int = 32, num_frames: int = 16, seed: int = 0,
                         train_per_class: int = 30, val_per_class: int = 10,
                         test_per_class: int = 10, cache_dir: str | Path | None = None) -> Path:
    """Generate (once) into the cache and return the folder, ready for
    ``VideoClassificationDataModule`` / ``KineticsDataset``."""
    root = motion_root(image_size, num_frames, seed, train_per_class, val_per_class,
                       test_per_class, cache_dir)
    return generate_motion_clips(root, image_size, num_frames, train_per_class, val_per_class,
                                 test_per_class, seed)
