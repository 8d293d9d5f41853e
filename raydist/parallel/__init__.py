"""How a batch is spread: over workers (elastic: one global batch on any worker count, positions inside
an epoch) and over one worker's devices (pipeline: a model split into stages fed micro-batches in turn).
"""
