"""Graph rewrite rules, one a file: each a pattern, a check that says why not, and a rewrite (``rule.py``)."""
