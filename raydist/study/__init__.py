"""Studies as files: the study (its settings and searched fields), its distributions, the study file read
and written in one module (study_file), and the scaling study's grid.
"""
