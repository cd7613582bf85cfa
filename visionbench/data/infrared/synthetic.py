"""The embedded default data set "thermal": procedural thermal-infrared street scenes.

A radiometric scene model in the long-wave band: each surface has a temperature, an
emissivity and the temperature of what it reflects (mostly the cold sky); its band radiance
(Planck at 10 um) becomes 14-bit camera counts through a random gain and offset. The scene:
a cold sky with warmer clouds, a horizon, ground with a 1/f (pink) texture, an asphalt road
in perspective, buildings with sun-heated and shaded faces and windows, trees, poles, and
people, cars and animals at sizes set by their distance on the ground plane, drawn far to
near so near ones occlude far ones, casting cool shadows by day. People, cars and animals
are only a few kelvin off their surroundings and sometimes at thermal crossover.

The camera: optical blur (Gaussian PSF), vignetting, pixel gain non-uniformity, column
fixed-pattern noise and temporal noise (NETD of 40-80 mK) in counts, quantized to
[0, 16383], then an automatic gain control to 8 bits as real cameras do it: linear between
two percentiles, or plateau histogram equalization.

Written in SODA's layout (``JPEGImages/``, ``SegmentationClassPNG/``, ``train_infrared.txt``,
``test_infrared.txt``) with SODA's class indices, and read back by ``SODADataset``. Images
are lossless 8-bit grey PNG (SODA's own are JPEG; the reader takes either); masks are
palette PNG like labelme2voc's. An unlabelled pretraining split of the same generator is
``pretrain/thermal/00000.png ...``: InfMix's ``<data set>/thermal/`` folder, which
``ImageFolderDataset(root / "pretrain")`` also reads. Each image comes from its own
``np.random.default_rng([seed, split, index])``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from visionbench.data.cache import default_cache_dir, write_once
from visionbench.data.infrared.readers import SODA_CLASSES
from visionbench.errors import DataError

GENERATOR_VERSION = 1
SUPERSAMPLE = 2
MAX_COUNTS = 2**14 - 1  # 14-bit detector

BACKGROUND, PERSON, BUILDING, TREE, ROAD, POLE, CAR, ANIMAL, SKY = (
    SODA_CLASSES.index(name)
    for name in ("_background_", "person", "building", "tree", "road", "pole", "car", "animal",
                 "sky")
)  # fmt: skip
THERMAL_CLASSES: dict[int, str] = {
    i: SODA_CLASSES[i] for i in (BACKGROUND, PERSON, BUILDING, TREE, ROAD, POLE, CAR, ANIMAL, SKY)
}
SPLIT_IDS = {"train": 0, "test": 1, "pretrain": 2}
SPLIT_FILES = {"train": "train_infrared.txt", "test": "test_infrared.txt"}

C2_OVER_LAMBDA = 14388.0 / 10.0  # second radiation constant / 10 um, in kelvin
KELVIN = 273.15


# ----------------------------------------------------------------------------- fields


def pink_noise_pair(
    rng: np.random.Generator, shape: tuple[int, int], beta_a: float = 1.0, beta_b: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Two independent zero-mean, unit-variance noise fields whose amplitude spectra fall as
    1/f**beta_a and 1/f**beta_b: the real and imaginary parts of one spectral synthesis."""
    h, w = shape
    white = rng.standard_normal((2, h, w), dtype=np.float32)
    spectrum = white[0] + 1j * white[1]
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.fftfreq(w).astype(np.float32)[None, :]
    freq = np.sqrt(fx**2 + fy**2)
    freq[0, 0] = np.inf  # no DC
    fields = []
    for part, beta in ((np.real, beta_a), (np.imag, beta_b)):
        field = part(np.fft.ifft2(spectrum / freq**beta)).astype(np.float32)
        fields.append((field - field.mean()) / (field.std() + 1e-12))
    return fields[0], fields[1]


def pink_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-variance noise whose amplitude spectrum falls as 1/f**beta."""
    return pink_noise_pair(rng, shape, beta, beta)[0]


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders."""
    if sigma <= 0:
        return a
    r = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    h, w = a.shape
    p = np.pad(a, r, mode="reflect")
    rows = sum(t * p[:, i : i + w] for i, t in enumerate(taps))
    return sum(t * rows[i : i + h, :] for i, t in enumerate(taps))


def band_radiance(temp_c: np.ndarray) -> np.ndarray:
    """Planck spectral radiance at 10 um, up to a constant, of a blackbody at ``temp_c``."""
    return 1.0 / np.expm1(C2_OVER_LAMBDA / (np.asarray(temp_c, np.float64) + KELVIN))


# ----------------------------------------------------------------------------- scene


class _Scene:
    """Painter's canvas: per pixel a temperature, emissivity, reflected temperature and label."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.temp = np.zeros((n, n), np.float32)
        self.eps = np.ones((n, n), np.float32)
        self.refl = np.zeros((n, n), np.float32)
        self.label = np.zeros((n, n), np.uint8)

    def mask(self, *shapes: tuple) -> np.ndarray:
        """Boolean mask of the union of ("poly", points), ("ellipse", box), ("line", pts, w)."""
        img = Image.new("L", (self.n, self.n), 0)
        draw = ImageDraw.Draw(img)
        for shape in shapes:
            kind, geom = shape[0], shape[1]
            if kind == "poly":
                draw.polygon([(float(x), float(y)) for x, y in geom], fill=255)
            elif kind == "ellipse":
                draw.ellipse([float(v) for v in geom], fill=255)
            else:
                width = max(1, int(round(shape[2])))
                draw.line([(float(x), float(y)) for x, y in geom], fill=255, width=width)
        return np.asarray(img) > 0

    def paint(
        self,
        m: np.ndarray,
        temp: float | np.ndarray,
        eps: float,
        refl: float,
        label: int | None = None,
    ) -> None:
        self.temp[m] = temp[m] if isinstance(temp, np.ndarray) else temp
        self.eps[m] = eps
        self.refl[m] = refl
        if label is not None:
            self.label[m] = label


def _rect(x0: float, y0: float, x1: float, y1: float) -> tuple:
    return ("poly", [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


class _World:
    """One scene's conditions: weather, time of day, camera pose on the ground plane."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        self.rng, self.n = rng, n
        self.day = rng.random() < 0.55
        self.t_air = rng.uniform(-5.0, 32.0)
        self.solar = rng.uniform(4.0, 18.0) if self.day else 0.0  # K on a dark sunlit surface
        self.sun_side = float(rng.choice([-1.0, 1.0]))  # the sun is to the left (-1) or right
        self.horizon = rng.uniform(0.28, 0.5) * n
        self.cam_height = rng.uniform(1.3, 3.5)  # metres
        cloudy = rng.random() < 0.4
        self.sky_drop = rng.uniform(5.0, 15.0) if cloudy else rng.uniform(18.0, 45.0)
        self.t_sky = self.t_air - 0.8 * self.sky_drop  # what horizontal-ish surfaces reflect
        heat = self.solar * rng.uniform(0.2, 0.9) if self.day else -rng.uniform(0.0, 3.0)
        self.t_ground = self.t_air + heat
        self.t_env = 0.5 * (self.t_sky + self.t_ground)  # what vertical surfaces reflect
        self.fine, self.coarse = pink_noise_pair(rng, (n, n), beta_a=0.5, beta_b=1.2)

    def scale(self, y_base: float) -> float:
        """Pixels per metre of an upright object standing on the ground at row ``y_base``."""
        return max(y_base - self.horizon, 0.0) / self.cam_height

    def texture(self, sigma: float, coarse: float = 0.5) -> np.ndarray:
        return sigma * ((1 - coarse) * self.fine + coarse * self.coarse)


def _sky_and_ground(s: _Scene, w: _World) -> None:
    n, rng = s.n, w.rng
    rows = np.arange(n, dtype=np.float32)[:, None]
    height = np.clip((w.horizon - rows) / n, 0, None)
    clear = w.t_air - 2.0 - (w.sky_drop - 2.0) * (1 - np.exp(-height / 0.25))
    cover = np.clip(w.coarse * rng.uniform(0.3, 0.7) + rng.uniform(-0.6, 0.4), 0, 1)
    sky = clear * (1 - cover) + (w.t_air - rng.uniform(3.0, 8.0)) * cover
    ground = w.t_ground + w.texture(rng.uniform(0.6, 2.5), coarse=0.7)
    above = np.broadcast_to(rows < w.horizon, (n, n))
    s.temp[:] = np.where(above, sky, ground)
    s.eps[:] = np.where(above, 1.0, 0.95)
    s.refl[:] = w.t_sky
    s.label[:] = np.where(above, SKY, BACKGROUND)


def _road(s: _Scene, w: _World) -> None:
    n, rng = s.n, w.rng
    vx = rng.uniform(0.25, 0.75) * n
    half_bottom = rng.uniform(0.25, 0.6) * n
    cx = vx + rng.uniform(-0.4, 0.4) * n
    top = w.horizon + 0.01 * n
    half_top = half_bottom * (top - w.horizon) / (n - w.horizon)
    road = s.mask(("poly", [(vx - half_top, top), (vx + half_top, top),
                            (cx + half_bottom, n), (cx - half_bottom, n)]))  # fmt: skip
    heat = w.solar * rng.uniform(0.4, 1.4) if w.day else rng.uniform(-0.5, 4.0)
    if rng.random() < 0.15:  # wet: evaporation holds it near air temperature
        heat = rng.uniform(-1.0, 1.0)
    s.paint(road, w.t_air + heat + w.texture(rng.uniform(0.3, 1.0), 0.4), 0.95, w.t_sky, ROAD)
    if rng.random() < 0.7:  # dashed centre line: paint is lighter, so cooler by day
        marks = []
        for k in range(12):
            t0, t1 = (k + 0.2) / 12, (k + 0.6) / 12
            y0, y1 = top + (n - top) * t0**1.6, top + (n - top) * t1**1.6
            x0 = vx + (cx - vx) * (y0 - top) / (n - top)
            x1 = vx + (cx - vx) * (y1 - top) / (n - top)
            marks.append(("line", [(x0, y0), (x1, y1)], max(1.0, 0.012 * (y1 - w.horizon))))
        line = s.mask(*marks) & road
        s.temp[line] -= (0.3 if w.day else 0.05) * w.solar + rng.uniform(0.2, 1.0)


def _building(s: _Scene, w: _World) -> None:
    n, rng = s.n, w.rng
    base = w.horizon + rng.uniform(0.01, 0.1) * n
    width = rng.uniform(0.15, 0.45) * n
    x0 = rng.uniform(-0.2, 1.0) * n - width / 2
    top = w.horizon - rng.uniform(0.1, 0.45) * n
    side = rng.uniform(0.15, 0.35) * width  # a receding side face, toward the sun or away
    sun_facing = rng.random() < 0.5
    front_heat = w.solar * (rng.uniform(0.3, 0.6) if sun_facing else rng.uniform(0.0, 0.2))
    side_heat = w.solar * (rng.uniform(0.0, 0.2) if sun_facing else rng.uniform(0.5, 0.9))
    loss = 0.0 if w.day else rng.uniform(1.0, 4.0)  # heat leaking from inside at night
    sx = x0 - side if rng.random() < 0.5 else x0 + width
    front_box = (x0, top, x0 + width, base)
    front = s.mask(_rect(*front_box))
    sx_outer = sx if sx < x0 else sx + side
    side_face = s.mask(("poly", [(sx if sx < x0 else x0 + width, top + 0.05 * side),
                                 (sx_outer, top + 0.15 * side), (sx_outer, base - 0.02 * side),
                                 (sx if sx < x0 else x0 + width, base)]))  # fmt: skip
    texture = w.texture(rng.uniform(0.3, 1.0), 0.6)
    eps = rng.uniform(0.88, 0.95)
    s.paint(front, w.t_air + front_heat + loss + texture, eps, w.t_env, BUILDING)
    s.paint(side_face, w.t_air + side_heat + loss + texture, eps, w.t_env, BUILDING)
    rows, cols = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    cell_w, cell_h = width / cols, (base - top) / rows
    lit = rng.uniform(0.0, 0.7) if not w.day else 0.0
    windows, warm = [], []
    for r in range(rows):
        for c in range(cols):
            wx, wy = x0 + (c + 0.25) * cell_w, top + (r + 0.25) * cell_h
            box = _rect(wx, wy, wx + 0.5 * cell_w, wy + 0.45 * cell_h)
            (warm if rng.random() < lit else windows).append(box)
    if windows:  # glass reflects the sky: cold by day
        s.paint(s.mask(*windows) & front, w.t_air + loss, 0.84, w.t_sky)
    if warm:
        s.paint(s.mask(*warm) & front, w.t_air + rng.uniform(5.0, 15.0), 0.84, w.t_sky)


def _shadow(s: _Scene, w: _World, x0: float, x1: float, y_base: float, height_px: float) -> None:
    """A cool patch on the ground and road beside an object, away from the sun (by day)."""
    if not w.day or height_px <= 0:
        return
    length = -w.sun_side * height_px * w.rng.uniform(0.4, 1.2)
    depth = height_px * w.rng.uniform(0.02, 0.12)
    m = s.mask(("poly", [(x0, y_base), (x1, y_base), (x1 + length, y_base + depth),
                         (x0 + length, y_base + depth)]))  # fmt: skip
    m &= (s.label == BACKGROUND) | (s.label == ROAD)
    s.temp[m] -= w.solar * w.rng.uniform(0.4, 0.8)


def _crossover(w: _World, warm: float, local: float) -> float:
    """A surface temperature ``warm``, or one within ~1 K of ``local`` at thermal crossover."""
    return local + w.rng.normal(0.0, 0.6) if w.rng.random() < 0.15 else warm


def _person(s: _Scene, w: _World, x: float, y: float) -> None:
    rng, k = w.rng, w.scale(y)
    height = rng.uniform(1.45, 1.9) * k
    half = 0.22 * k
    head_r, hip = 0.11 * k, y - 0.48 * height
    shoulder, neck = y - 0.82 * height, y - 0.86 * height
    stride = rng.uniform(-0.25, 0.25) * k
    swing = rng.uniform(-0.15, 0.15) * k
    lean = rng.uniform(-0.04, 0.04) * height
    body = [
        ("poly", [(x - half + lean, shoulder), (x + half + lean, shoulder),
                  (x + 0.8 * half, hip), (x - 0.8 * half, hip)]),
        ("line", [(x - 0.4 * half, hip), (x - 0.4 * half + stride, y)], 0.14 * k),
        ("line", [(x + 0.4 * half, hip), (x + 0.4 * half - stride, y)], 0.14 * k),
        ("line", [(x - half + lean, shoulder), (x - 1.1 * half + swing, hip)], 0.1 * k),
        ("line", [(x + half + lean, shoulder), (x + 1.1 * half - swing, hip)], 0.1 * k),
    ]  # fmt: skip
    head = ("ellipse", (x + lean - head_r, neck - 2 * head_r, x + lean + head_r, neck))
    _shadow(s, w, x - half, x + half, y, height)
    skin = 34.0 - 0.25 * (34.0 - w.t_air)
    cloth = w.t_air + (skin - w.t_air) * rng.uniform(0.1, 0.5) + 0.3 * w.solar
    cloth = _crossover(w, cloth, w.t_ground)
    head_t = skin if abs(cloth - w.t_ground) > 1.5 else w.t_ground + rng.uniform(0.5, 2.0)
    tex = w.texture(rng.uniform(0.2, 0.6), 0.2)
    s.paint(s.mask(*body), cloth + tex, 0.97, w.t_env, PERSON)
    s.paint(s.mask(head), head_t + tex, 0.98, w.t_env, PERSON)


def _car(s: _Scene, w: _World, x: float, y: float) -> None:
    rng, k = w.rng, w.scale(y)
    running = rng.random() < 0.6
    paint_eps = rng.uniform(0.8, 0.92)
    body_t = w.t_air + w.solar * rng.uniform(0.4, 1.1) + (rng.uniform(0.5, 2) if running else 0)
    body_t = _crossover(w, body_t, w.t_ground) if not running else body_t
    tyre_t = w.t_air + (rng.uniform(3.0, 10.0) if running else 0.3 * w.solar)
    h = rng.uniform(1.35, 1.6) * k
    tex = w.texture(rng.uniform(0.2, 0.5), 0.3)
    if rng.random() < 0.6:  # side view
        length = rng.uniform(4.0, 4.8) * k
        x0, x1 = x - length / 2, x + length / 2
        front_left = rng.random() < 0.5
        sill, belt = y - 0.2 * k, y - 0.62 * h
        a, b = (0.22, 0.72) if front_left else (0.28, 0.78)
        cabin = [(x0 + (a - 0.08) * length, belt), (x0 + a * length, y - h),
                 (x0 + b * length, y - h), (x0 + (b + 0.08) * length, belt)]  # fmt: skip
        lower = _rect(x0, belt, x1, sill)
        _shadow(s, w, x0, x1, y, h)
        s.paint(s.mask(lower, ("poly", cabin)), body_t + tex, paint_eps, w.t_env, CAR)
        glass = [(px, py + (0.12 * h if py < belt else -0.02 * h)) for px, py in cabin]
        glass = [(glass[0][0] + 0.04 * length, glass[0][1]), glass[1], glass[2],
                 (glass[3][0] - 0.04 * length, glass[3][1])]  # fmt: skip
        s.paint(s.mask(("poly", glass)), w.t_air, 0.85, w.t_sky)
        if running:
            hood = (x0, x0 + 0.25 * length) if front_left else (x1 - 0.25 * length, x1)
            s.paint(s.mask(_rect(hood[0], belt, hood[1], sill)),
                    w.t_air + rng.uniform(8.0, 25.0) + tex, paint_eps, w.t_env)  # fmt: skip
        r = 0.33 * k
        wheels = [("ellipse", (cx - r, y - 2 * r, cx + r, y))
                  for cx in (x0 + 0.18 * length, x1 - 0.18 * length)]  # fmt: skip
        s.paint(s.mask(*wheels), tyre_t + tex, 0.95, w.t_env, CAR)
    else:  # seen from behind or in front
        width = rng.uniform(1.7, 1.9) * k
        x0, x1 = x - width / 2, x + width / 2
        belt = y - 0.62 * h
        shape = [(x0, y - 0.12 * k), (x0, belt), (x0 + 0.12 * width, y - h),
                 (x1 - 0.12 * width, y - h), (x1, belt), (x1, y - 0.12 * k)]  # fmt: skip
        _shadow(s, w, x0, x1, y, h)
        s.paint(s.mask(("poly", shape)), body_t + tex, paint_eps, w.t_env, CAR)
        s.paint(s.mask(_rect(x0 + 0.16 * width, y - 0.95 * h, x1 - 0.16 * width, belt - 0.04 * h)),
                w.t_air, 0.85, w.t_sky)  # fmt: skip
        tyres = [_rect(x0 + 0.04 * width, y - 0.3 * k, x0 + 0.2 * width, y),
                 _rect(x1 - 0.2 * width, y - 0.3 * k, x1 - 0.04 * width, y)]  # fmt: skip
        s.paint(s.mask(*tyres), tyre_t + tex, 0.95, w.t_env, CAR)
        if running:  # exhaust pipe
            ex = x0 + rng.uniform(0.15, 0.85) * width
            r = max(0.06 * k, 0.6)
            s.paint(s.mask(("ellipse", (ex - r, y - 0.3 * k - r, ex + r, y - 0.3 * k + r))),
                    w.t_air + rng.uniform(20.0, 60.0), 0.9, w.t_env)  # fmt: skip


def _animal(s: _Scene, w: _World, x: float, y: float) -> None:
    rng, k = w.rng, w.scale(y)
    length = rng.uniform(0.7, 1.2) * k
    height = rng.uniform(0.5, 0.8) * k
    facing = float(rng.choice([-1.0, 1.0]))
    body_top, body_bot = y - height, y - 0.45 * height
    x0, x1 = x - length / 2, x + length / 2
    head_x = x + facing * length / 2
    head_r = 0.13 * k
    leg_w = 0.07 * k
    legs = [("line", [(lx, body_bot - 0.05 * height), (lx + rng.uniform(-0.06, 0.06) * k, y)],
             leg_w) for lx in (x0 + 0.12 * length, x0 + 0.25 * length,
                               x1 - 0.25 * length, x1 - 0.12 * length)]  # fmt: skip
    tail = ("line", [(x - facing * length / 2, body_top + 0.1 * height),
                     (x - facing * (length / 2 + 0.25 * k), body_top - rng.uniform(-0.1, 0.2) * k)],
            0.05 * k)  # fmt: skip
    parts = [
        ("ellipse", (x0, body_top, x1, body_bot)),
        ("ellipse", (head_x - head_r, body_top - 1.6 * head_r,
                     head_x + head_r, body_top + 0.4 * head_r)),
        ("ellipse", (head_x + facing * 0.6 * head_r - 0.8 * head_r, body_top - 0.9 * head_r,
                     head_x + facing * 0.6 * head_r + 0.8 * head_r, body_top + 0.1 * head_r)),
        *legs,
        tail,
    ]  # fmt: skip
    _shadow(s, w, x0, x1, y, height)
    fur = _crossover(w, w.t_air + rng.uniform(2.0, 9.0) + 0.3 * w.solar, w.t_ground)
    s.paint(s.mask(*parts), fur + w.texture(rng.uniform(0.3, 0.8), 0.2), 0.97, w.t_env, ANIMAL)


def _tree(s: _Scene, w: _World, x: float, y: float) -> None:
    rng, k = w.rng, w.scale(y)
    height = rng.uniform(4.0, 9.0) * k
    trunk_h = rng.uniform(0.25, 0.45) * height
    trunk_w = max(rng.uniform(0.2, 0.45) * k, 1.0)
    crown_r = rng.uniform(0.25, 0.4) * height
    cy = y - trunk_h - crown_r * 0.8
    blobs = []
    for _ in range(int(rng.integers(4, 9))):
        dx, dy = rng.normal(0, 0.45, 2) * crown_r
        r = crown_r * rng.uniform(0.4, 0.75)
        blobs.append(("ellipse", (x + dx - r, cy + dy - r, x + dx + r, cy + dy + r)))
    _shadow(s, w, x - crown_r, x + crown_r, y, height)
    leaf_t = w.t_air + (0.15 * w.solar if w.day else -rng.uniform(0.0, 1.5))
    s.paint(s.mask(_rect(x - trunk_w / 2, y - trunk_h - crown_r * 0.5, x + trunk_w / 2, y)),
            w.t_air + 0.3 * w.solar + w.texture(0.3, 0.2), 0.95, w.t_env, TREE)  # fmt: skip
    leaves = leaf_t + w.texture(rng.uniform(0.6, 1.8), 0.1)
    s.paint(s.mask(*blobs), leaves, 0.98, w.t_sky, TREE)


def _pole(s: _Scene, w: _World, x: float, y: float) -> None:
    rng, k = w.rng, w.scale(y)
    height = rng.uniform(5.0, 9.0) * k
    width = max(rng.uniform(0.12, 0.25) * k, 1.0)
    parts = [_rect(x - width / 2, y - height, x + width / 2, y)]
    if rng.random() < 0.5:  # a lamp arm
        arm = float(rng.choice([-1.0, 1.0])) * rng.uniform(0.8, 1.8) * k
        parts.append(("line", [(x, y - height), (x + arm, y - height - 0.2 * k)], width * 0.8))
    _shadow(s, w, x - width, x + width, y, height)
    metal = rng.random() < 0.6  # bare metal reflects the cold sky; painted poles do not
    eps = rng.uniform(0.2, 0.5) if metal else rng.uniform(0.85, 0.95)
    s.paint(s.mask(*parts), w.t_air + 0.5 * w.solar, eps, w.t_sky, POLE)


PLACERS = {PERSON: _person, CAR: _car, ANIMAL: _animal, TREE: _tree, POLE: _pole}
# (mean number per image, probability of at least one) of each upright object
OBJECT_COUNTS = {PERSON: (2.4, 0.75), CAR: (1.6, 0.6), ANIMAL: (1.4, 0.45),
                 TREE: (1.8, 0.5), POLE: (1.6, 0.5)}  # fmt: skip
# Apparent size range in image heights per metre of the object, e.g. a 1.7 m person from
# 0.15 to 0.65 image heights tall, a car 0.1-0.3 high (its side 0.3-0.9 wide), an animal
# 0.08-0.25 high, poles and trees at least 0.3 high.
SCALE_RANGE = {
    PERSON: (0.15 / 1.7, 0.65 / 1.7),
    CAR: (0.1 / 1.5, 0.3 / 1.5),
    ANIMAL: (0.08 / 0.65, 0.25 / 0.65),
    TREE: (0.3 / 6.5, 0.15),
    POLE: (0.3 / 7.0, 0.15),
}


def _ground_objects(w: _World) -> list[tuple[float, int, float]]:
    """(base row, class, x) of every upright object, far ones first.

    The apparent scale (pixels per metre) is log-uniform, as distance on a ground plane
    roughly is; it fixes the base row: ``horizon + scale * camera height``.
    """
    rng, n = w.rng, w.n
    items: list[tuple[float, int, float]] = []
    for cls, (mean, p_any) in OBJECT_COUNTS.items():
        if rng.random() >= p_any:
            continue
        for _ in range(1 + int(rng.poisson(max(mean - 1.0, 0.0)))):
            lo, hi = (v * n for v in SCALE_RANGE[cls])
            hi = min(hi, (1.08 * n - w.horizon) / w.cam_height)
            scale = float(np.exp(rng.uniform(np.log(lo), np.log(max(hi, lo * 1.01)))))
            y = w.horizon + scale * w.cam_height
            if items and rng.random() < 0.35:  # next to an earlier one: occlusion
                x = items[int(rng.integers(len(items)))][2] + rng.normal(0, 0.08) * n
            else:
                x = rng.uniform(-0.05, 1.05) * n
            items.append((y, cls, x))
    return sorted(items, key=lambda item: item[0])


def _scene_temperatures(rng: np.random.Generator, n: int) -> tuple[_Scene, _World]:
    s, w = _Scene(n), _World(rng, n)
    _sky_and_ground(s, w)
    if rng.random() < 0.85:
        _road(s, w)
    for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3, 4]))):
        _building(s, w)
    for y, cls, x in _ground_objects(w):
        PLACERS[cls](s, w, x, y)
    return s, w


def _box_down(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape
    return a.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def render_counts(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene as raw 14-bit camera counts (uint16 in [0, 16383]) and its SODA label map."""
    s, _ = _scene_temperatures(rng, image_size * SUPERSAMPLE)
    radiance = s.eps * band_radiance(s.temp) + (1 - s.eps) * band_radiance(s.refl)
    radiance = _box_down(radiance, SUPERSAMPLE)
    label = s.label[SUPERSAMPLE // 2 :: SUPERSAMPLE, SUPERSAMPLE // 2 :: SUPERSAMPLE].copy()
    n = image_size
    responsivity = rng.uniform(6.0e5, 9.0e5)  # counts per unit of band radiance
    offset = rng.uniform(1500.0, 3500.0)
    signal = gaussian_blur(responsivity * radiance, rng.uniform(0.5, 1.1))  # optics PSF
    yy, xx = (np.mgrid[0:n, 0:n] - (n - 1) / 2) / ((n - 1) / 2)
    signal *= 1.0 - rng.uniform(0.03, 0.15) * (xx**2 + yy**2) / 2  # vignetting, cos^4-like
    signal *= 1.0 + rng.normal(0.0, 0.004, (n, n))  # pixel gain non-uniformity
    counts_per_k = responsivity * 1.35e-4  # d(radiance)/dT near 300 K
    column_fpn = rng.normal(0.0, rng.uniform(0.02, 0.12) * counts_per_k, (1, n))
    temporal = rng.normal(0.0, rng.uniform(0.04, 0.08) * counts_per_k, (n, n))  # NETD
    counts = np.rint(offset + signal + column_fpn + temporal)
    return np.clip(counts, 0, MAX_COUNTS).astype(np.uint16), label


def automatic_gain_control(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """14-bit counts to 8 bits: linear between two percentiles, or plateau equalization."""
    c = counts.astype(np.float64)
    if rng.random() < 0.5:
        lo, hi = np.percentile(c, [rng.uniform(0.2, 2.0), rng.uniform(98.0, 99.8)])
        hi = max(hi, lo + 64.0)  # a gain ceiling: flat scenes are not stretched into noise
        out = (c - lo) / (hi - lo) * 255.0
    else:  # plateau histogram equalization, the default AGC of many microbolometer cameras
        hist = np.bincount(counts.ravel(), minlength=MAX_COUNTS + 1).astype(np.float64)
        plateau = rng.uniform(0.002, 0.02) * counts.size
        cdf = np.cumsum(np.minimum(hist, plateau))
        lo_index = int(np.argmax(hist > 0))
        cdf = (cdf - cdf[lo_index]) / max(cdf[-1] - cdf[lo_index], 1.0)
        out = cdf[counts] * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_thermal(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One 8-bit thermal image (``image_size`` square, uint8) and its SODA label map."""
    counts, label = render_counts(rng, image_size)
    return automatic_gain_control(counts, rng), label


# ----------------------------------------------------------------------------- on disk


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (what labelme2voc writes into SegmentationClassPNG)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def thermal_root(
    image_size: int = 96,
    seed: int = 0,
    n_train: int = 400,
    n_test: int = 160,
    n_pretrain: int = 800,
    cache_dir: str | Path | None = None,
) -> Path:
    """The cache folder of one parameter set, e.g. ``thermal-v1-96px-s0-n400-160-800``."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / (
        f"thermal-v{GENERATOR_VERSION}-{image_size}px-s{seed}-n{n_train}-{n_test}-{n_pretrain}"
    )


def _params(image_size: int, n_train: int, n_test: int, n_pretrain: int, seed: int) -> dict:
    return {
        "generator": "thermal",
        "version": GENERATOR_VERSION,
        "image_size": image_size,
        "counts": {"train": n_train, "test": n_test, "pretrain": n_pretrain},
        "seed": seed,
        "layout": "soda",
        "classes": {str(i): name for i, name in THERMAL_CLASSES.items()},
    }


def _write(tmp: Path, image_size: int, counts: dict[str, int], seed: int) -> None:
    images, masks = tmp / "JPEGImages", tmp / "SegmentationClassPNG"
    pretrain = tmp / "pretrain" / "thermal"
    for folder in (images, masks, pretrain):
        folder.mkdir(parents=True)
    palette = voc_palette()
    stems: dict[str, list[str]] = {"train": [], "test": []}
    number = 0
    with tqdm(total=sum(counts.values()), desc="thermal", leave=False) as bar:
        for split in ("train", "test", "pretrain"):
            for index in range(counts[split]):
                rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
                image, label = render_thermal(rng, image_size)
                if split == "pretrain":
                    Image.fromarray(image).save(pretrain / f"{index:05d}.png")
                else:
                    stem = f"{number:05d}"
                    number += 1
                    Image.fromarray(image).save(images / f"{stem}.png")
                    mask = Image.fromarray(label, mode="P")
                    mask.putpalette(palette)
                    mask.save(masks / f"{stem}.png")
                    stems[split].append(stem)
                bar.update()
    for split, name in SPLIT_FILES.items():
        (tmp / name).write_text("".join(f"{stem}\n" for stem in stems[split]))


def generate_thermal(
    root: str | Path,
    image_size: int = 96,
    n_train: int = 400,
    n_test: int = 160,
    n_pretrain: int = 800,
    seed: int = 0,
) -> Path:
    """Write the thermal data set to ``root`` (SODA layout) unless it is already there.

    Written to a temporary sibling folder renamed to ``root`` once complete, so ``root`` is
    either absent or whole. A finished ``root`` with other parameters is an error.
    """
    if image_size < 16:
        raise DataError(f"thermal image_size {image_size} too small (expected >= 16)")
    wanted = _params(image_size, n_train, n_test, n_pretrain, seed)
    counts = {"train": n_train, "test": n_test, "pretrain": n_pretrain}
    return write_once(root, wanted, "thermal",
                      lambda tmp: _write(tmp, image_size, counts, seed))


def prepare_thermal(
    root: str | Path | None = None,
    seed: int = 0,
    n_train: int = 400,
    n_test: int = 160,
    n_pretrain: int = 800,
    size: int = 96,
    cache_dir: str | Path | None = None,
) -> Path:
    """Generate (once) and return the folder, ready for ``SODADataset(root, split)``.

    ``root`` defaults to ``thermal_root(...)`` in the cache; the unlabelled pretraining
    images are in ``root / "pretrain" / "thermal"``.
    """
    if root is None:
        root = thermal_root(size, seed, n_train, n_test, n_pretrain, cache_dir)
    return generate_thermal(root, size, n_train, n_test, n_pretrain, seed)
