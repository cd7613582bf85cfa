"""Multispectral (Sentinel-2) data: the band table, GeoTIFF reading and writing (rasterio),
readers of EuroSAT-MS, BigEarthNet-S2 and GeoTIFF folders, and the embedded generator of
Sentinel-2 scenes that writes those layouts."""
