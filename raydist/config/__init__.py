"""TODO docstring: raydist.config."""
