"""Fine-tuning: the schedule, callbacks, checkpoints, strategies, records, the paper's experiments."""
