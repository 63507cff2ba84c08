"""merv.extract.encoders."""
