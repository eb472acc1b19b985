"""Defences: RobustKD feature detoxification (and, later, fine-tuning and NAD baselines)."""
