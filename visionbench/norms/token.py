"""Token norm layers beyond LayerNorm/RMSNorm (filled in by the catalog work of issue 3)."""
