"""Evaluation: local JSONL tasks (herd/eval/tasks.py)."""
