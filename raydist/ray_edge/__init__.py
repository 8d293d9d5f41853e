"""TODO docstring: raydist.ray_edge."""
