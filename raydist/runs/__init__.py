"""The files of a run folder, one owner each: checkpoints and the final model (checkpoints), config.yaml,
classes.json and --resume targets (run_folder), history.jsonl (history).
"""
