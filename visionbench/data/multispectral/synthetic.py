"""The embedded multispectral data: procedural Sentinel-2 scenes written as georeferenced
uint16 GeoTIFFs in the EuroSAT-MS layout (single label) and the BigEarthNet-S2 layout
(multi-label), read back by ``readers``.

A scene is a map of materials (water, broad-leaved and coniferous forest, green crop, bare
soil, grass, shrub, roof, asphalt, sand, marsh), each with a reflectance spectrum at the 13
band centres (``MATERIAL_SPECTRA``: vegetation's red edge from B04 to B07 and its NIR
plateau, water's absorption in the NIR and SWIR, soil rising into the SWIR, B10 near zero
over the surface) and a texture. Materials are mixed at their boundaries (a blur of the
abundance maps), then every band gets multiplicative texture, sensor noise and a smooth
additive haze (stronger at short wavelengths, with a cirrus signal in B10), and is stored as
reflectance x 10000.

EuroSAT-MS (``EUROSAT_CLASSES``, its 10 class folders) is built so that spatial structure,
not a spectrum alone, tells classes apart: River and SeaLake share water and land (a
meandering band against a shoreline); Highway, Industrial and Residential share asphalt
(a road across fields; large roof and asphalt blocks; a grid of small roofs with streets and
gardens); AnnualCrop and PermanentCrop share crop
and soil (fields against rows); Pasture and HerbaceousVegetation share grass and shrub
(large even parcels against patchy cover); Forest mixes two forest types under canopy
texture. BigEarthNet-S2 patches are Voronoi mosaics of CORINE land-cover regions (a subset of
the 43-class nomenclature, ``BIGEARTHNET_REGIONS``), labelled with every class covering at
least ``LABEL_MIN_FRACTION`` of the patch; a band is stored at its own resolution
(10 m: 120 px, 20 m: 60 px, 60 m: 20 px, block means of the 10 m scene).

Layouts (what torchgeo's ``EuroSAT`` and ``BigEarthNet`` read):
- ``root/ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<n>.tif``:
  13 bands in EuroSAT's file order (B8A last), 64 x 64 at 10 m, and
  ``root/eurosat-{train,val,test}.txt`` of file names;
- ``root/BigEarthNet-v1.0/<patch>/<patch>_<band>.tif`` (12 bands, no B10) with
  ``<patch>_labels_metadata.json`` (``labels``: CORINE names), and
  ``root/bigearthnet-{train,val,test}.csv`` of ``<s2 patch>,<s1 patch>`` lines.
Tiles are in UTM zone 32N (EPSG:32632), each at its own offset on a grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from visionbench.data.cache import default_cache_dir, write_once
from visionbench.data.fields import smooth_noise
from visionbench.data.multispectral.bands import (
    BIGEARTHNET_BANDS,
    EUROSAT_FILE_ORDER,
    REFLECTANCE_SCALE,
    RESOLUTION_M,
    S2_BANDS,
)
from visionbench.data.multispectral.geotiff import write_geotiff
from visionbench.errors import ConfigError

GENERATOR_VERSION = 1
CRS = "EPSG:32632"
SPLITS = ("train", "val", "test")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
EUROSAT_SIZE = 64
BIGEARTHNET_SIZE = 120
EUROSAT_DIR = "ds/images/remote_sensing/otherDatasets/sentinel_2/tif"
BIGEARTHNET_DIR = "BigEarthNet-v1.0"
LABEL_MIN_FRACTION = 0.05

# reflectance at B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B10 B11 B12
MATERIAL_SPECTRA = {
    "water": (0.065, 0.060, 0.050, 0.032, 0.026, 0.020, 0.018, 0.015, 0.013, 0.008, 0.001,
              0.007, 0.004),
    "broadleaf": (0.040, 0.035, 0.065, 0.032, 0.090, 0.250, 0.330, 0.360, 0.370, 0.350,
                  0.003, 0.180, 0.080),
    "conifer": (0.035, 0.030, 0.050, 0.026, 0.065, 0.160, 0.205, 0.225, 0.230, 0.215, 0.003,
                0.120, 0.055),
    "crop": (0.050, 0.048, 0.085, 0.050, 0.125, 0.300, 0.390, 0.430, 0.440, 0.410, 0.004,
             0.220, 0.110),
    "soil": (0.085, 0.095, 0.125, 0.165, 0.185, 0.205, 0.220, 0.235, 0.245, 0.240, 0.005,
             0.330, 0.270),
    "grass": (0.050, 0.050, 0.080, 0.062, 0.120, 0.240, 0.290, 0.315, 0.325, 0.300, 0.004,
              0.250, 0.140),
    "shrub": (0.055, 0.055, 0.075, 0.075, 0.115, 0.185, 0.215, 0.235, 0.245, 0.230, 0.004,
              0.270, 0.170),
    "roof": (0.120, 0.125, 0.140, 0.160, 0.170, 0.180, 0.190, 0.200, 0.205, 0.195, 0.006,
             0.240, 0.215),
    "asphalt": (0.080, 0.080, 0.088, 0.095, 0.102, 0.110, 0.115, 0.120, 0.122, 0.118, 0.004,
                0.140, 0.125),
    "sand": (0.150, 0.170, 0.220, 0.270, 0.295, 0.310, 0.320, 0.330, 0.335, 0.330, 0.006,
             0.380, 0.320),
    "marsh": (0.045, 0.042, 0.062, 0.045, 0.085, 0.160, 0.190, 0.200, 0.205, 0.180, 0.003,
              0.120, 0.060),
}
MATERIALS = tuple(MATERIAL_SPECTRA)
HAZE_SHAPE = np.array([0.12, 0.10, 0.08, 0.06, 0.05, 0.045, 0.04, 0.035, 0.033, 0.03, 0.0,
                       0.012, 0.006])
TEXTURE = {"water": 0.02, "broadleaf": 0.12, "conifer": 0.14, "crop": 0.06, "soil": 0.06,
           "grass": 0.05, "shrub": 0.10, "roof": 0.10, "asphalt": 0.04, "sand": 0.05,
           "marsh": 0.08}

EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake")

# CORINE classes (of BigEarthNet's 43) a region can be, and its materials with weights
BIGEARTHNET_REGIONS = {
    "Continuous urban fabric": (("roof", 0.75), ("asphalt", 0.25)),
    "Discontinuous urban fabric": (("roof", 0.45), ("grass", 0.35), ("asphalt", 0.2)),
    "Industrial or commercial units": (("roof", 0.6), ("asphalt", 0.4)),
    "Non-irrigated arable land": (("crop", 0.55), ("soil", 0.45)),
    "Vineyards": (("shrub", 0.5), ("soil", 0.5)),
    "Pastures": (("grass", 1.0),),
    "Broad-leaved forest": (("broadleaf", 1.0),),
    "Coniferous forest": (("conifer", 1.0),),
    "Mixed forest": (("broadleaf", 0.5), ("conifer", 0.5)),
    "Natural grassland": (("grass", 0.6), ("shrub", 0.4)),
    "Transitional woodland/shrub": (("shrub", 0.6), ("broadleaf", 0.4)),
    "Beaches, dunes, sands": (("sand", 1.0),),
    "Inland marshes": (("marsh", 0.7), ("water", 0.3)),
    "Water bodies": (("water", 1.0),),
    "Sea and ocean": (("water", 1.0),),
}


# ----------------------------------------------------------------------------- fields


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of the last two axes (edges reflected)."""
    radius = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = [(0, 0)] * (x.ndim - 2) + [(radius, radius), (radius, radius)]
    y = np.pad(x, pad, mode="reflect")
    y = sum(k[i] * y[..., i : i + x.shape[-2], :] for i in range(len(k)))
    return sum(k[i] * y[..., i : i + x.shape[-1]] for i in range(len(k)))


def voronoi(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """``(n, n)`` int: the nearest of ``cells`` random seeds (fields, parcels, regions)."""
    seeds = rng.uniform(0, n, (cells, 2))
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    d = (ys[None] - seeds[:, 0, None, None]) ** 2 + (xs[None] - seeds[:, 1, None, None]) ** 2
    return d.argmin(axis=0)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    return ys / n, xs / n  # in [0, 1)


def _pick(rng: np.random.Generator, options: tuple[str, ...], count: int) -> list[str]:
    return [options[i] for i in rng.integers(0, len(options), count)]


# ----------------------------------------------------------------------------- EuroSAT scenes


def _fields(rng, n, materials, cells):
    cell = voronoi(rng, n, cells)
    names = _pick(rng, materials, cells)
    return np.array([MATERIALS.index(m) for m in names])[cell], cell


def _line(rng, n, width):
    """A gently curving band across the tile (a road, a river): ``(n, n)`` bool."""
    ys, xs = _grid(n)
    theta = rng.uniform(0, np.pi)
    u = (xs - 0.5) * np.cos(theta) + (ys - 0.5) * np.sin(theta)  # along
    v = -(xs - 0.5) * np.sin(theta) + (ys - 0.5) * np.cos(theta)  # across
    bend = rng.uniform(0.02, 0.08) * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * u
                                             + rng.uniform(0, 2 * np.pi))
    return np.abs(v - rng.uniform(-0.2, 0.2) - bend) < width / (2 * n)


def eurosat_scene(class_name: str, n: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(material index ``(n, n)``, region id ``(n, n)`` for per-region brightness) of one
    scene of ``class_name`` on an ``n``-pixel canvas."""
    m = MATERIALS.index
    region = np.zeros((n, n), dtype=np.int64)
    if class_name == "AnnualCrop":
        mat, region = _fields(rng, n, ("crop", "soil", "crop"), int(rng.integers(6, 15)))
    elif class_name == "PermanentCrop":
        region = voronoi(rng, n, int(rng.integers(2, 5)))
        ys, xs = np.mgrid[0:n, 0:n] + 0.5
        mat = np.empty((n, n), dtype=np.int64)
        for r in range(region.max() + 1):
            theta, period = rng.uniform(0, np.pi), rng.uniform(4.0, 7.0) * n / 128
            rows = np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period) > 0
            row_material = m("crop") if rng.random() < 0.5 else m("shrub")
            mat = np.where(region == r, np.where(rows, row_material, m("soil")), mat)
    elif class_name == "Pasture":
        mat, region = _fields(rng, n, ("grass",), int(rng.integers(2, 5)))
        if rng.random() < 0.5:
            mat = np.where(_line(rng, n, 3 * n / 128), m("shrub"), mat)  # a hedge
    elif class_name == "HerbaceousVegetation":
        a, b = smooth_noise(rng, n, 1.2, 0.2), smooth_noise(rng, n, 1.2, 0.2)
        mat = np.where(a > 0.3, m("shrub"), np.where(b > 0.8, m("soil"), m("grass")))
    elif class_name == "Forest":
        kind = smooth_noise(rng, n, 2.0, 0.1) + rng.uniform(-1.5, 1.5)
        mat = np.where(kind > 0, m("broadleaf"), m("conifer"))
    elif class_name == "Highway":
        mat, region = _fields(rng, n, ("grass", "crop", "soil"), int(rng.integers(4, 9)))
        mat = np.where(_line(rng, n, rng.uniform(4, 7) * n / 128), m("asphalt"), mat)
    elif class_name == "Industrial":
        mat = np.where(smooth_noise(rng, n, 2.0) > 0, m("grass"), m("soil"))
        for _ in range(int(rng.integers(5, 9))):
            h, w = rng.uniform(0.25, 0.5, 2) * n
            top, left = rng.uniform(-0.1, 0.9, 2) * n
            ys, xs = np.mgrid[0:n, 0:n]
            box = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
            mat = np.where(box, m("roof") if rng.random() < 0.7 else m("asphalt"), mat)
    elif class_name == "Residential":
        ys, xs = np.mgrid[0:n, 0:n] + 0.5
        theta = rng.uniform(0, np.pi / 2)
        u = xs * np.cos(theta) + ys * np.sin(theta)
        v = -xs * np.sin(theta) + ys * np.cos(theta)
        block = rng.uniform(7, 11) * n / 128
        house = ((u % block) < 0.55 * block) & ((v % block) < 0.55 * block)
        street = ((u % (3 * block)) > 2.8 * block)
        garden = np.where(smooth_noise(rng, n, 1.5) > 0.5, m("broadleaf"), m("grass"))
        mat = np.where(street, m("asphalt"), np.where(house, m("roof"), garden))
    elif class_name == "River":
        mat, region = _fields(rng, n, ("grass", "crop", "broadleaf"), int(rng.integers(3, 7)))
        mat = np.where(_line(rng, n, rng.uniform(6, 16) * n / 128), m("water"), mat)
    elif class_name == "SeaLake":
        shore = smooth_noise(rng, n, 2.5, 0.08)
        level = np.quantile(shore, rng.uniform(0.05, 0.35))
        land = np.where(smooth_noise(rng, n, 2.0) > 0, m("grass"), m("sand"))
        mat = np.where(shore > level, m("water"), land)
    else:
        raise ConfigError(f"EuroSAT class {class_name!r} (expected one of {EUROSAT_CLASSES})")
    return mat, region


# ----------------------------------------------------------------------------- spectra


def render(material: np.ndarray, region: np.ndarray, size: int,
           rng: np.random.Generator) -> np.ndarray:
    """Reflectance ``(13, size, size)`` in ``S2_BANDS`` order of a ``material`` map drawn at
    a multiple of ``size``: abundances averaged over each output pixel and blurred (mixed
    pixels at boundaries), each material's spectrum with its own texture, a brightness per
    region, then haze and sensor noise."""
    n = material.shape[0]
    f = n // size
    spectra = np.array([MATERIAL_SPECTRA[k] for k in MATERIALS])  # (M, 13)
    abundance = (material[None] == np.arange(len(MATERIALS))[:, None, None]).astype(float)
    abundance = abundance.reshape(len(MATERIALS), size, f, size, f).mean(axis=(2, 4))
    abundance = blur(abundance, 0.5)
    gain = rng.uniform(0.88, 1.12, region.max() + 1)[region]
    gain = gain.reshape(size, f, size, f).mean(axis=(1, 3))
    refl = np.zeros((len(S2_BANDS), size, size))
    for k, name in enumerate(MATERIALS):
        if abundance[k].max() <= 0:
            continue
        texture = 1.0 + TEXTURE[name] * smooth_noise(rng, size, 0.8, 0.5)
        refl += abundance[k][None] * spectra[k][:, None, None] * texture[None]
    refl *= gain[None]
    haze = rng.uniform(0.0, 0.6) * (0.6 + 0.4 * np.tanh(smooth_noise(rng, size, 2.5, 0.1)))
    refl += HAZE_SHAPE[:, None, None] * haze[None]
    refl[S2_BANDS.index("B10")] += 0.01 * haze  # cirrus
    refl += rng.normal(0.0, 0.002, refl.shape)
    return refl


def to_digital_numbers(refl: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(refl * REFLECTANCE_SCALE), 0, 65535).astype(np.uint16)


def tile_transform(index: int, size: int, resolution: float = 10.0):
    """The 10 m transform of tile ``index`` on a grid of tiles in UTM 32N."""
    from affine import Affine

    row, col = divmod(index, 100)
    x0, y0 = 300000.0 + col * size * 10.0, 5600000.0 - row * size * 10.0
    return Affine(resolution, 0.0, x0, 0.0, -resolution, y0)


# ----------------------------------------------------------------------------- BigEarthNet


def bigearthnet_scene(n: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(material ``(n, n)``, region ``(n, n)``, the CORINE names of the patch's labels): a
    Voronoi mosaic of 2 - 6 regions, each a land-cover class whose materials are mixed by
    thresholded noise; a class is a label when it covers >= ``LABEL_MIN_FRACTION``."""
    names = list(BIGEARTHNET_REGIONS)
    region = voronoi(rng, n, int(rng.integers(2, 7)))
    classes = [names[i] for i in rng.integers(0, len(names), region.max() + 1)]
    mat = np.zeros((n, n), dtype=np.int64)
    for r, name in enumerate(classes):
        parts = BIGEARTHNET_REGIONS[name]
        u = (np.tanh(smooth_noise(rng, n, 1.5, 0.2)) + 1) / 2  # in (0, 1)
        edges = np.cumsum([w for _, w in parts])[:-1]
        choice = np.searchsorted(edges, u)
        inside = np.array([MATERIALS.index(p) for p, _ in parts])[choice]
        mat = np.where(region == r, inside, mat)
    cover = {}
    for r, name in enumerate(classes):
        cover[name] = cover.get(name, 0.0) + float((region == r).mean())
    labels = sorted(name for name, share in cover.items() if share >= LABEL_MIN_FRACTION)
    return mat, region, labels


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    return x.reshape(x.shape[0] // f, f, x.shape[1] // f, f).mean(axis=(1, 3))


# ----------------------------------------------------------------------------- on disk


def write_eurosat(tmp: Path, counts: dict[str, int], seed: int, bar) -> None:
    folder = tmp / EUROSAT_DIR
    order = [S2_BANDS.index(b) for b in EUROSAT_FILE_ORDER]
    index = 0
    for split, count in counts.items():
        names = []
        for class_id, name in enumerate(EUROSAT_CLASSES):
            (folder / name).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                rng = np.random.default_rng([seed, SPLIT_IDS[split], class_id, k])
                mat, region = eurosat_scene(name, 2 * EUROSAT_SIZE, rng)
                dn = to_digital_numbers(render(mat, region, EUROSAT_SIZE, rng))[order]
                stem = f"{name}_{SPLIT_IDS[split]}{k:05d}"
                write_geotiff(folder / name / f"{stem}.tif", dn, crs=CRS,
                              transform=tile_transform(index, EUROSAT_SIZE),
                              names=EUROSAT_FILE_ORDER)
                names.append(f"{stem}.jpg\n")  # the official split files name the RGB jpgs
                index += 1
                bar.update()
        (tmp / f"eurosat-{split}.txt").write_text("".join(names))


def write_bigearthnet(tmp: Path, counts: dict[str, int], seed: int, bar) -> None:
    folder = tmp / BIGEARTHNET_DIR
    index = 0
    for split, count in counts.items():
        lines = []
        for k in range(count):
            rng = np.random.default_rng([seed, 10 + SPLIT_IDS[split], k])
            mat, region, labels = bigearthnet_scene(2 * BIGEARTHNET_SIZE, rng)
            refl = render(mat, region, BIGEARTHNET_SIZE, rng)
            patch = f"S2A_MSIL2A_20170613T101031_{SPLIT_IDS[split]}_{k}"
            (folder / patch).mkdir(parents=True)
            transform = tile_transform(index, BIGEARTHNET_SIZE)
            for band in BIGEARTHNET_BANDS:
                f = RESOLUTION_M[band] // 10
                data = _block_mean(refl[S2_BANDS.index(band)], f)
                write_geotiff(folder / patch / f"{patch}_{band}.tif",
                              to_digital_numbers(data), crs=CRS,
                              transform=transform @ transform.scale(f, f), names=(band,))
            ulx, uly = transform.c, transform.f
            meta = {"labels": labels,
                    "coordinates": {"ulx": ulx, "uly": uly,
                                    "lrx": ulx + 10.0 * BIGEARTHNET_SIZE,
                                    "lry": uly - 10.0 * BIGEARTHNET_SIZE},
                    "projection": CRS, "tile_source": "visionbench synthetic",
                    "acquisition_date": "2017-06-13 10:10:31"}
            (folder / patch / f"{patch}_labels_metadata.json").write_text(json.dumps(meta))
            lines.append(f"{patch},S1A_IW_GRDH_1SDV_20170613T165043_{SPLIT_IDS[split]}_{k}\n")
            index += 1
            bar.update()
        (tmp / f"bigearthnet-{split}.csv").write_text("".join(lines))


def _params(layout: str, counts: dict[str, int], seed: int) -> dict:
    return {"generator": "sentinel2", "layout": layout, "version": GENERATOR_VERSION,
            "per_split": counts, "seed": seed}


def _counts(train: int, val: int, test: int, what: str) -> dict[str, int]:
    counts = {"train": train, "val": val, "test": test}
    if any(c < 1 for c in counts.values()):
        raise ConfigError(f"{what}: {counts} (expected at least 1 a split: torchgeo's "
                          "readers need every split file and every class in it)")
    return counts


def prepare_eurosat_ms(train_per_class: int = 20, val_per_class: int = 5,
                       test_per_class: int = 10, seed: int = 0,
                       cache_dir: str | Path | None = None) -> Path:
    """The EuroSAT-MS layout of synthetic scenes, written once into the cache."""
    counts = _counts(train_per_class, val_per_class, test_per_class, "EuroSAT-MS tiles a class")
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = base / (f"eurosat-ms-v{GENERATOR_VERSION}-s{seed}-n{train_per_class}-"
                   f"{val_per_class}-{test_per_class}")

    def write(tmp: Path) -> None:
        total = sum(counts.values()) * len(EUROSAT_CLASSES)
        with tqdm(total=total, desc="EuroSAT-MS tiles", leave=False) as bar:
            write_eurosat(tmp, counts, seed, bar)

    return write_once(root, _params("eurosat-ms", counts, seed), "EuroSAT-MS", write)


def prepare_bigearthnet(train: int = 200, val: int = 50, test: int = 100, seed: int = 0,
                        cache_dir: str | Path | None = None) -> Path:
    """The BigEarthNet-S2 (v1) layout of synthetic patches, written once into the cache."""
    counts = _counts(train, val, test, "BigEarthNet patches a split")
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = base / f"bigearthnet-v{GENERATOR_VERSION}-s{seed}-n{train}-{val}-{test}"

    def write(tmp: Path) -> None:
        with tqdm(total=sum(counts.values()), desc="BigEarthNet patches", leave=False) as bar:
            write_bigearthnet(tmp, counts, seed, bar)

    return write_once(root, _params("bigearthnet-s2", counts, seed), "BigEarthNet", write)
