"""GeoTIFF reading and writing through rasterio: bands by index or description, nodata as a
mask, resampling to an output shape (how BigEarthNet's 20 m and 60 m bands reach 120 px).

A file rasterio cannot open or read is a ``DataError`` naming it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionbench.errors import DataError

RESAMPLING = ("nearest", "bilinear", "cubic", "average")


@dataclass
class Raster:
    """Bands ``(C, H, W)`` with their georeference: ``transform`` (an ``affine.Affine``),
    ``crs`` (a ``rasterio.crs.CRS`` or None), ``nodata`` (the file's value or None),
    ``valid`` (``(H, W)`` bool, False where every band is nodata) and band ``names`` (the
    file's band descriptions, None where unnamed)."""

    data: np.ndarray
    transform: object
    crs: object
    nodata: float | None
    valid: np.ndarray
    names: tuple[str | None, ...]


def write_geotiff(path: str | Path, data: np.ndarray, *, transform, crs,
                  nodata: float | None = None, names: Sequence[str] | None = None,
                  compress: str = "deflate") -> None:
    """``data`` ``(C, H, W)`` (or ``(H, W)``) as a tiled GeoTIFF with ``transform`` / ``crs``,
    ``nodata`` and the band ``names`` as descriptions."""
    import rasterio

    array = data[None] if data.ndim == 2 else data
    count, height, width = array.shape
    if names is not None and len(names) != count:
        raise ValueError(f"{len(names)} band names for {count} bands")
    profile = {"driver": "GTiff", "height": height, "width": width, "count": count,
               "dtype": array.dtype.name, "crs": crs, "transform": transform,
               "compress": compress}
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
        for i, name in enumerate(names or (), start=1):
            dst.set_band_description(i, name)


def read_geotiff(path: str | Path, bands: Sequence[int] | None = None,
                 out_shape: tuple[int, int] | None = None, resampling: str = "bilinear",
                 fill: float = 0.0) -> Raster:
    """Read ``bands`` (1-based, default all) of a GeoTIFF, resampled to ``out_shape`` with
    ``resampling`` (rasterio's, as torchgeo's BigEarthNet reads 20 / 60 m bands at 120 px);
    nodata pixels become ``fill`` and are False in ``valid`` (nodata where every band is)."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError

    if resampling not in RESAMPLING:
        raise ValueError(f"resampling {resampling!r} (expected one of {', '.join(RESAMPLING)})")
    try:
        with rasterio.open(path) as src:
            indexes = list(bands) if bands is not None else list(range(1, src.count + 1))
            bad = [i for i in indexes if not 1 <= i <= src.count]
            if bad:
                raise DataError(f"{path}: band {bad[0]} of a {src.count}-band file")
            shape = (len(indexes), *(out_shape or (src.height, src.width)))
            data = src.read(indexes, out_shape=shape,
                            resampling=getattr(Resampling, resampling))
            masks = src.read_masks(indexes, out_shape=shape, resampling=Resampling.nearest)
            transform = src.transform @ Affine.scale(src.width / shape[2],
                                                     src.height / shape[1])
            names = tuple(src.descriptions[i - 1] for i in indexes)
            raster = Raster(data, transform, src.crs, src.nodata, masks.any(axis=0), names)
    except RasterioError as err:
        raise DataError(f"{path}: not a readable GeoTIFF ({err})") from None
    if src.nodata is not None:
        raster.data = np.where(masks > 0, data, np.asarray(fill, dtype=data.dtype))
    return raster
