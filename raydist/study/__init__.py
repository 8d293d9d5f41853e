"""TODO docstring: raydist.study."""
