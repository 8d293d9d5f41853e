"""TODO docstring: raydist.parallel."""
