"""Our own lean model definitions."""
