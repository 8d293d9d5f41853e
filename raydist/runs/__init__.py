"""TODO docstring: raydist.runs."""
