"""Model conversions and test-time norm methods (filled in by the catalog work of issue 3)."""
