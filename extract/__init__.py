"""merv.extract."""
