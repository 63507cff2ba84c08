"""merv.train."""
