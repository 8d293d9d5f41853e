"""A run's configuration as data: TrainConfig's fields, units, defaults and the checks that need nothing
but the values (fields), and the YAML reading every config and study file goes through (yaml_files).
The checks that need data sets, folders or models are raydist.preflight's.
"""
