"""Run folders, metric logs, checkpoints, progress bars and plots."""
