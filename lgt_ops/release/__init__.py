"""Versioned, immutable dataset releases: Parquet splits, manifest, dataset card, report."""
