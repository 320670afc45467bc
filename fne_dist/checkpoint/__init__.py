"""Checkpoints: one layout, written atomically, validated before anything is loaded.

Layout of ``<checkpoint.dir>/step-<optimizer step, 8 digits>/``:

    meta.json             written last: step, micro step, epoch, samples seen, world size,
                          loader workers, ZeRO stage, the training shards (pattern and
                          fingerprint), and size + sha256 of every file below
    config.yaml           the resolved config of the run that wrote it
    model.safetensors     the model's fp32 weights, gathered (what `fne_dist.export` copies)
    engine/ ...           the engine's state, written by ``engine.save_checkpoint``: DeepSpeed's
                          own files (model, optimizer, lr scheduler, every ZeRO partition), or
                          for the plain-DDP twin state.safetensors + state.json (``save_state``)
    momentum.safetensors  the momentum encoders (identical on every rank)
    memory.safetensors    the memory: embeddings, ids, groups, write order, pointer
    stats.safetensors     the FNE sufficient statistics (all-reduced: identical on every rank)
    rank-<r>.json         per rank: its rank and step, data position, Python/NumPy RNG
                          states, loop counters
    rank-<r>.safetensors  per rank: torch RNG state(s); its rank and step in the header

A checkpoint is valid only when meta.json lists ``rank-<r>.*`` of every rank and every listed
file matches its hash. A crash at any point leaves either no ``step-N`` or a complete one; a
later truncation or corruption is caught by the hashes, and resume falls back to the newest
valid checkpoint with a warning naming the bad one. Rank files moved to another rank or step
(meta.json re-hashed) are refused on load, and so is state that does not fit this run's
objects: one line each, never a traceback.

Several nodes: a local checkpoint.dir must be one directory that every node sees
(``check_shared_dir`` fails at launch otherwise); with a URL checkpoint.dir each node writes to
its own scratch directory, every rank uploads its share, and rank 0 uploads meta.json last.

Modules, bottom up (each imports only those above it in this list; this package's
``__init__`` imports none of them, so the engine can import the format without the rest):

    format         names, hashes, safetensors + JSON state (``save_state``), rank files, RNG
    validation     meta.json and hashes checked; the newest valid checkpoint; memory shape
    pickle_safety  DeepSpeed's pickled files opened with ``weights_only=True`` first
    remote         checkpoint.dir as a URL: upload (meta.json last), list, download
    collective     the save every rank calls together, and the restore (uses the engine)

When to save and where to resume from is policy: ``fne_dist.checkpointer``.
"""
