"""TODO docstring: raydist.output."""
