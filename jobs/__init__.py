"""Entry points for `ray job submit` (configuration, Parquet input, storage, manifests, resume, report)."""
