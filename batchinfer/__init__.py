"""batchinfer: Ray-distributed batch LLM inference, Parquet prompts in, Parquet results out, exactly once.

Layers, top to bottom (checked by the import contracts in pyproject.toml): cli, runner,
scheduler, worker, run_store, results, engines, prompts, plan and lease, readers,
model_refs and atomic, storage, config_loader, config, and the leaf modules (registry,
records, errors, fingerprint).
"""
