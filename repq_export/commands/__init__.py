"""Command-line entry points: repq-export and the tools/ scripts."""
