"""Tiny offline models for tests and demos only (never imported by the library modules)."""
