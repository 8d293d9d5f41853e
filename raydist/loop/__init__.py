"""The per-worker training loop, plain PyTorch (no Ray): run (epochs, reports, checkpoints), state (model,
optimizer, schedule, one epoch's training), evaluate, recipe, spot (spot notices and resizes of elastic
runs), worker_data (data and weights loaded once per node) and context (what the launcher gives the loop:
Ray's worker, a local process, or a one-worker trial's run folder).
"""
