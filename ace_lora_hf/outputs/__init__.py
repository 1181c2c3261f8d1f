"""Writing outputs without losing what a user has: checked paths, atomic writes, result files that stream."""
