"""chunkft planner: trace a model's training step, cost it, and solve a plan that fits a budget."""

__version__ = "0.1.0"
