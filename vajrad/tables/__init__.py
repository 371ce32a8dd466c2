"""One module per table; each defines TABLE (see vajrad/schema.py)."""
