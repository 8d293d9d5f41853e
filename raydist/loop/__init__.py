"""TODO docstring: raydist.loop."""
