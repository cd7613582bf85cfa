"""Conv norm layers beyond BatchNorm/GroupNorm (filled in by the catalog work of issue 3)."""
