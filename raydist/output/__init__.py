"""What people read: the console's lines and progress bars (console), tables and plots (report,
run_curves, scaling_report) and W&B logging (wandb_log).
"""
