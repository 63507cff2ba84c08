"""Shared test helpers, importable as `testkit` because pytest's `pythonpath` puts tests/ on sys.path.

media: synthetic and shipped videos / images; llm: tiny LLMs, tokenizers and padding; tasks: a
small instruction-data + feature-store task and run configs over it.
"""
