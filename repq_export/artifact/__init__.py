"""An exported artifact directory read back: repq.json parsed and checked once, its files verified."""
