"""Generators of REAL checkpoint fixtures (written with the real libraries) for ckptctl tests."""
